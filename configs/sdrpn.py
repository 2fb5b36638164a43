"""Stage 1 — SD-RPN: train the twig (T decoder layers branching off base layer K) to predict the teacher's
RoI map, backbone frozen (training reference §1.5-§1.7).

    python -m qzoom_jax.train --config=configs/sdrpn.py          # embedded default: labels + training, minutes
    python -m qzoom_jax.train --config=configs/sdrpn.py:qwen2_5vl_7b \\
        --config.model.path=/ckpt/Qwen2.5-VL-7B-Instruct \\
        --config.data.pickle=/data/qwen2_5vl_pseudo_7b_576res_185k.pkl --workdir=gs://bucket/runs/sdrpn_7b

Labels come from, in this order: ``data.label_dirs`` (prepared label datasets, e.g. from
``python -m qzoom_jax.labels``), ``data.pickle`` (an upstream released stage-1 pickle, images under its
directory or ``data.image_root``), or else a label run with ``teacher`` (configs/labels.py) into the workdir.
Every field can be overridden: ``--config.optim.lr=5e-5``.

Stage 2.5 (Qwen3-VL only, training reference §3) re-fits the twig on the stage-2 LLM::

    python -m qzoom_jax.train --config=configs/sdrpn.py:qwen3vl_4b_stage2_5 \\
        --config.model.path=/ckpt/qzoom-qwen3vl-4b-stage2 \\
        --config.teacher.data.jsonl=/data/stage1_universal.jsonl --config.teacher.data.image_root=/data \\
        --workdir=gs://bucket/runs/sdrpn_4b_stage2_5

``model.path`` is the stage-2 model (a Hugging Face directory, e.g. the post-SFT run exported); it is both the
frozen backbone and the label teacher, whose twig never runs while it labels (upstream's §8 #10 garbage cannot
happen: the teacher is a plain forward of the base layers). ``model.twig_init``: "model" = the twig of
``model.path`` (a Q-Zoom directory still holding the stage-1 twig), or a stage-1 run directory; the twig continues
from it instead of copies of base layers (upstream's ``--is_2_5_stage``). ``data.roi_samples``: the seed-42
shuffled subset of labelled records that trains (20000, as upstream).
"""

import ml_collections

from qzoom_jax.assets.repo_configs import config_module

# The paper's (K, T) per backbone (training reference §0); the paper's hyperparameters otherwise (§1.7).
PRESETS = {
    "tiny": {"K": 3, "T": 3},
    "qwen2_5vl_3b": {"K": 24, "T": 3},
    "qwen2_5vl_7b": {"K": 18, "T": 3},
    "qwen3vl_4b": {"K": 24, "T": 3},
}
# Stage 2.5 presets: name -> the backbone preset whose (K, T) and teacher heads they use.
STAGE2_5 = {"qwen3vl_4b_stage2_5": "qwen3vl_4b"}


def get_config(arg=None):
    preset = arg or "tiny"
    if preset not in PRESETS and preset not in STAGE2_5:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS) + sorted(STAGE2_5)}")
    stage2_5, preset = preset in STAGE2_5, STAGE2_5.get(preset, preset)
    tiny = preset == "tiny"
    c = ml_collections.ConfigDict()
    c.name = "sdrpn" if not arg else f"sdrpn_{arg}"
    c.stage = "sdrpn"  # qzoom_jax.training.stages: what train.main trains
    c.seed = 42
    # The frozen backbone: path None = the embedded tiny checkpoint. It is referenced by path from every
    # checkpoint, never copied.
    c.model = dict(
        path=ml_collections.config_dict.placeholder(str) if tiny else "",
        dtype="bfloat16",
        attn_impl="xla",
        # "" = copies of base layers K..K+T-1 (stage 1); "model" = the twig of model.path; or a stage-1 run dir.
        twig_init="model" if stage2_5 else "",
        **PRESETS[preset],
    )
    c.teacher = config_module("labels", beside=__file__).teacher_config(preset)
    # grid: the label grid, i.e. merged image tokens per side (must match the labels); max_len: prompt tokens.
    c.data = {
        "label_dirs": (),
        "pickle": "",
        "image_root": "",
        "grid": c.teacher.grid,
        "binary_coff": 0.25,
        "bg_coff": 0.05,
        "max_len": 384 if tiny else 768,
        # "upstream": upstream's training text (no system turn, a literal "<image>" before the image block);
        # "inference": the evaluation format, so the twig trains on what it sees at test time (reference §8 #6).
        "chat_format": "upstream",
        "worker_count": 0 if tiny else 4,
        # > 0: train on the first roi_samples labelled records after a seed-42 shuffle (upstream's roi_samples)
        "roi_samples": 20000 if stage2_5 else 0,
    }
    c.train = {
        "global_batch_size": 8 if tiny else (256 if stage2_5 else 128),
        "num_epochs": 4 if tiny else 1,
        "num_steps": 0,
        "log_every": 1 if tiny else 10,
        "checkpoint_every": 50 if tiny else 200,
        "max_to_keep": 3,
        "roi_threshold": 0.5,
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
    # (logical axis, mesh axes) pairs replacing entries of qzoom_jax.runtime.parallel.DEFAULT_RULES, e.g.
    # --config.sharding_rules="(('mlp', None),)" to stop tensor-sharding the MLPs.
    c.sharding_rules = ()
    return c
