"""Stage 3 — the dynamic gate: train T decoder layers branching off base layer K plus a Linear(d -> 1) head to
predict whether a question needs the high-resolution look, backbone frozen (training reference §4).

    python -m qzoom_jax.train --config=configs/gate.py           # embedded default: answers + training, minutes
    python -m qzoom_jax.train --config=configs/gate.py:qwen2_5vl_7b \\
        --config.model.path=/ckpt/qzoom-qwen2_5vl-7b-stage2 --config.model.twig_run=gs://bucket/runs/sdrpn_7b \\
        --config.data.pickle=/data/qwen2_5vl_7b_stage3.pkl --workdir=gs://bucket/runs/gate_7b

Labels come from, in this order: ``data.label_dirs`` (answer datasets, e.g. from ``python -m qzoom_jax.labels
--config=configs/labels.py:gate_<preset>``), ``data.pickle`` (an upstream stage-3 pickle, images under its
directory or ``data.image_root``), or else an answer run with ``answers`` (configs/labels.py) into the workdir.
The consistency rules pick the training pool (``WORKDIR/data/gate_pool.json`` records it and the rule counts);
each fetch draws its label and budget anew. ``model.twig_run`` names the stage-1 run whose twig goes with this
gate: it is checked (same K) and recorded in the checkpoint meta for inference. Every field can be overridden:
``--config.optim.lr=5e-5``.
"""

import ml_collections

from qzoom_jax.assets.repo_configs import config_module


# The paper's (K, T) per backbone (training reference §0): the gate branches where the twig does.
PRESETS = config_module("sdrpn", beside=__file__).PRESETS


def get_config(arg=None):
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    tiny = preset == "tiny"
    c = ml_collections.ConfigDict()
    c.name = "gate" if not arg else f"gate_{preset}"
    c.stage = "gate"
    c.seed = 42
    # The frozen backbone (upstream: the stage-2 LLM): path None = the embedded tiny checkpoint. twig_run: the
    # stage-1 run directory whose twig goes with this gate ("" = none yet).
    c.model = dict(
        path=ml_collections.config_dict.placeholder(str) if tiny else "",
        dtype="bfloat16",
        attn_impl="xla",
        twig_run="",
        **PRESETS[preset],
    )
    c.answers = config_module("labels", beside=__file__).answers_config(preset)
    # roi_samples: cap on the pool (upstream keeps 20K); high: the consensus group (the top answers that must
    # agree); max_len: prompt tokens incl. up to 1.5x the largest drawn budget of image tokens.
    c.data = {
        "label_dirs": (),
        "pickle": "",
        "image_root": "",
        "roi_samples": 20000,
        "high": 2,
        "max_len": 192 if tiny else 512,
        "worker_count": 0 if tiny else 4,
    }
    c.train = {
        "global_batch_size": 8 if tiny else 256,
        "num_epochs": 3 if tiny else 1,
        "num_steps": 0,
        "log_every": 1 if tiny else 5,
        "checkpoint_every": 50 if tiny else 20,
        "max_to_keep": 3,
        "threshold": 0.5,  # the gate fires at p >= threshold (precision / recall / accuracy metrics)
    }
    c.optim = {
        "lr": 1e-4,
        "warmup_ratio": 0.03,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "clip_norm": 1.0,
    }
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    # (logical axis, mesh axes) pairs replacing entries of qzoom_jax.runtime.parallel.DEFAULT_RULES.
    c.sharding_rules = ()
    return c
