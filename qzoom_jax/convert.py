"""Checkpoints out to PyTorch and in from it — ``python -m qzoom_jax.convert``.

    python -m qzoom_jax.convert --from-run runs/gate --out exported/        # training run -> HF Q-Zoom directory
    python -m qzoom_jax.convert --from-run runs/sdrpn_qwen2_5vl_7b --out exported/ --dtype bfloat16 \\
        --max-shard-size 5GB
    python -m qzoom_jax.convert --from-hf /ckpt/Qwen2.5-VL-7B-Instruct --out /ckpt/qwen7b_jax    # HF -> ours

``--from-run``: the run's checkpoint meta names the backbone; a stage-3 run also names its stage-1 run, whose
twig goes along (``--twig RUN`` gives or replaces it), also when that twig was trained on the base model of this
gate's stage-2 backbone. An SFT run (``configs/sft.py``, stage 2 ``configs/post_sft.py``) exports the backbone
with its trained leaves (no branch). A QMoP run (``configs/qmop.py``, a reconstruction) exports the backbone plus
``qmop.safetensors`` and config.json's ``"qmop"`` (``checkpoints/qmop_checkpoint.py``). The result is one Hugging Face directory: safetensors in
the official transformers-4.x key layout (``visual.*``, ``model.layers.*``, ``lm_head``; none for tied
embeddings), sharded with ``model.safetensors.index.json``, in ``--dtype``; the Q-Zoom branches under upstream's
names (``model.twig_layers.{i}.*``, ``model.high_res_layers.{i}.*``, ``model.high_res_head.*``) with the config
keys upstream's loader reads; the backbone's tokenizer and processor files. ``transformers`` loads it as a
Qwen2.5-VL (it ignores the branch tensors); upstream's Q-Zoom code loads all of it. The backbone is sharded over
every device and written one tensor at a time, so host memory holds about one shard (``--max-shard-size``).

``--from-hf``: an HF directory (plain or Q-Zoom) -> our Orbax model directory (``qzoom_jax.orbax_params``),
which every entry point accepts as a model path.

Both directions write into a temporary sibling of ``--out`` and rename it into place when complete (an existing
``--out`` is replaced then), so ``--out`` holds the old complete output or the new one, never a mix; a failure
or a kill midway leaves the old one as it was. A problem with a checkpoint or a flag value prints one line,
``error: <message>``, and exits with status 2 (``--verbosity 1``: the traceback).
"""

from __future__ import annotations

import argparse
import os
import re

from qzoom_jax.checkpoints import atomic, hf_export, orbax_params, qmop_checkpoint, qzoom_checkpoint, sft_run
from qzoom_jax.runtime import cli, parallel
from qzoom_jax.runtime.errors import ConfigError
from qzoom_jax.checkpoints.pretrained import load_pretrained

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' / '500MiB' / '1000000' -> bytes (as transformers' ``max_shard_size``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MiB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r}")
    return size


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m qzoom_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-run", metavar="RUN_DIR", help="a training run directory (stage 1, 2, 3 or SFT)")
    source.add_argument("--from-hf", metavar="HF_DIR", help="a Hugging Face Qwen2.5-VL (or Q-Zoom) directory")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--twig", metavar="RUN_DIR", help="--from-run: the stage-1 run whose twig to export")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of the written tensors (the backbone is read in it; trained branches are cast)")
    p.add_argument("--max-shard-size", type=parse_size, default=hf_export.DEFAULT_MAX_SHARD_BYTES,
                   help="--from-run: largest safetensors file (default 2GiB)")
    p.add_argument("--verbosity", type=int, default=0, help="1: show the traceback of an error")
    return p.parse_args(argv)


def _check_out(out: str, sources) -> None:
    """``out`` may be replaced as a whole: it is no source (nor holds one), and if it exists it is a model
    directory (config.json), not some directory that happens to be named."""
    real = os.path.realpath(out)
    for source in sources:
        if source and "://" not in source and os.path.commonpath([real, os.path.realpath(source)]) == real:
            raise ConfigError(f"--out {out} would replace {source}, which this conversion reads")
    if os.path.exists(out) and not (os.path.isdir(out) and (not os.listdir(out) or os.path.isfile(
            os.path.join(out, "config.json")))):
        raise ConfigError(f"--out {out} exists and is not a model directory (no config.json); not replacing it")


def main(argv=None) -> str:
    with cli.user_errors():  # a bad flag: one line, before --verbosity is known
        args = parse_args(argv)
    with cli.user_errors(traceback=args.verbosity >= 1):
        return _convert(args)


def _convert(args: argparse.Namespace) -> str:
    out = os.path.abspath(args.out)
    _check_out(out, (args.from_run, args.from_hf, args.twig))  # before the minutes a large backbone takes
    mesh = parallel.make_mesh()  # the backbone is spread over every device, whatever its size
    run = args.from_run and qzoom_checkpoint.is_run_dir(args.from_run)
    meta = qzoom_checkpoint.run_meta(args.from_run) if run else {}
    if meta.get("stage") == "sft":  # an SFT run (stage 2 included): the backbone with the trained leaves
        if args.twig:
            raise ConfigError(f"--twig: {args.from_run} is an SFT run, whose export holds no branch")
        _check_out(out, (meta["backbone"],))
        sft_run.export(args.from_run, out, dtype=args.dtype)
        print(f"wrote {out}: the fine-tuned model of {args.from_run}")
    elif meta.get("stage") == "qmop":  # a QMoP run (a reconstruction): the backbone + qmop.safetensors
        if args.twig:
            raise ConfigError(f"--twig: {args.from_run} is a QMoP run, whose export holds no twig")
        qparams, qcfg, backbone = qmop_checkpoint.load(args.from_run)
        _check_out(out, (backbone,))
        model = load_pretrained(backbone, dtype=args.dtype, mesh=mesh)
        with atomic.replacing(out) as tmp:
            qmop_checkpoint.save_hf(model, backbone, qparams, qcfg, tmp, dtype=args.dtype,
                                    max_shard_bytes=args.max_shard_size)
        print(f"wrote {out}: backbone {backbone} + the QMoP projector ({qmop_checkpoint.QMOP_FILE}, config 'qmop')")
    elif args.from_run:
        parts = qzoom_checkpoint.load(args.from_run, twig_run=args.twig, dtype=args.dtype, mesh=mesh)
        _check_out(out, (parts.backbone_path,))  # named by the run's meta
        with atomic.replacing(out) as tmp:
            qzoom_checkpoint.save_hf(parts, tmp, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
        branches = [name for name, part in (("twig", parts.twig), ("gate", parts.gate)) if part is not None]
        print(f"wrote {out}: backbone {parts.backbone_path} + {' + '.join(branches) or 'no branch'} (K={parts.K})")
    else:
        model = load_pretrained(args.from_hf, dtype=args.dtype, mesh=mesh)
        with atomic.replacing(out) as tmp:
            orbax_params.save(model.params, model.config, tmp, files_from=args.from_hf)
        print(f"wrote {out} ({orbax_params.PARAMS_DIR}/ + config.json) from {os.path.abspath(args.from_hf)}")
    return out


if __name__ == "__main__":
    main()
