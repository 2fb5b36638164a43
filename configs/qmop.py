"""QMoP -- query-guided mixture of projectors, a RECONSTRUCTION (arXiv 2603.21232 is known only from its abstract;
every setting below that the abstract does not give is ours, see ``qzoom_jax/models/qmop/config.py``).

    python -m qzoom_jax.train --config=configs/qmop.py            # tiny: embedded model, reading task, < 1 min CPU
    python -m qzoom_jax.train --config=configs/qmop.py:qwen2_5vl_7b --config.model.path=/ckpt/Qwen2.5-VL-7B-Instruct \\
        --config.data.jsonl=/data/sft.jsonl --config.data.image_root=/data/images --workdir=gs://bucket/runs/qmop_7b

The backbone (vision tower and LLM) is frozen and carries no optimizer state; the projector's branches and
router train by self-distillation: ``train.kl_weight`` * KL(frozen uncompressed model || compressed model) on the
answer tokens (temperature ``train.temperature``) + ``train.ce_weight`` * cross-entropy on the answer. Data: the
SFT conversation JSONL the SFT trainer reads (``data.jsonl``), prepared datasets (``data.tfds_dirs``), or -- both
empty -- ``data.reading`` reading-task conversations (both question kinds) written into the run directory.
``qmop.*`` are the projector's options (``QMoPConfig``), recorded in the run and exported under ``"qmop"``.
"""

import ml_collections

PRESETS = ("tiny", "qwen2_5vl_3b", "qwen2_5vl_7b")


def get_config(arg=None):
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    tiny = preset == "tiny"
    c = ml_collections.ConfigDict()
    c.name = "qmop" if not arg else f"qmop_{preset}"
    c.stage = "qmop"
    c.seed = 42
    c.model = dict(path=ml_collections.config_dict.placeholder(str) if tiny else "", dtype="float32" if tiny
                   else "bfloat16", attn_impl="xla")
    c.qmop = dict(
        stride=2,  # r = stride**2 = 4 merged tokens per compressed token
        mlp_ratio=1.0,
        resampler_layers=1 if tiny else 2,
        resampler_heads=4 if tiny else 16,
        resampler_query_init="pooled",
        prune_dim=0,
        prune_positions="source",
        router_hidden=0,
        router_temperature=1.0,
        train_route="soft",
        infer_route="top1",
        pos_freqs=16,
    )
    c.data = {
        "jsonl": "",
        "tfds_dirs": (),
        "image_root": "",
        "reading": 64 if tiny else 0,
        "max_len": 256 if tiny else 8192,
        "max_patches": 1024 if tiny else 16384,
        "max_images": 1 if tiny else 4,
        "min_pixels": 16 * 28 * 28 if tiny else 256 * 28 * 28,
        "max_pixels": 64 * 28 * 28 if tiny else 1280 * 28 * 28,
        "worker_count": 0 if tiny else 8,
        "chat_format": "inference",  # the prompt the engine serves (infer / evaluate) is what it learns on
    }
    c.train = {
        "kl_weight": 1.0,
        "ce_weight": 1.0,
        "temperature": 1.0,
        "loss_chunk": 1024,
        "global_batch_size": 8 if tiny else 128,
        "accum_steps": 1 if tiny else 4,
        "num_epochs": 1,
        "num_steps": 8 if tiny else 0,
        "log_every": 1 if tiny else 10,
        "checkpoint_every": 4 if tiny else 500,
        "max_to_keep": 3,
    }
    c.optim = {
        "lr": 1e-3 if tiny else 1e-4,
        "warmup_ratio": 0.03,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "clip_norm": 1.0,
    }
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    c.sharding_rules = ()
    return c
