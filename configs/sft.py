"""Supervised fine-tuning of a chosen part of the VLM on upstream's conversation JSONL (training reference §5.2).

    python -m qzoom_jax.train --config=configs/sft.py --config.data.jsonl=data/reading_sft.jsonl   # tiny, CPU
    python -m qzoom_jax.train --config=configs/sft.py:qwen2_5vl_7b --config.model.path=/ckpt/Qwen2.5-VL-7B-Instruct \\
        --config.data.jsonl=/data/sft.jsonl --config.data.image_root=/data/images --workdir=gs://bucket/runs/sft_7b

``train.trainable``: regexes, each ``re.match``-ed against parameter paths such as ``model/layers/mlp/up_proj/kernel``,
``visual/merger/mlp_0/kernel``, ``visual/blocks/...``, ``model/embed_tokens/embedding``, ``lm_head/kernel``; every
pattern must match something. Matching leaves get ``train.master_dtype`` master weights and AdamW state sharded
over (fsdp, tensor); the rest stays frozen in ``model.dtype`` and gets no gradient. Each batch is one shape bucket
(tokens and patch rows padded to ``runtime.buckets.bucket`` sizes, at most ``data.max_len`` / ``data.max_patches``;
longer records are skipped and counted): the run prints the buckets that occur and compiles one step for each.
Every field can be overridden: ``--config.train.trainable="('model/layers/',)"``.
"""

import ml_collections

# Whole LLM (decoder, embeddings, lm_head) and the merger train; the ViT blocks stay frozen (upstream's default
# tune_mm_llm + tune_mm_mlp).
LLM_AND_MERGER = ("model/", "lm_head/", "visual/merger/")
PRESETS = {"tiny": {}, "qwen2_5vl_3b": {}, "qwen2_5vl_7b": {}, "qwen3vl_4b": {}}


def get_config(arg=None):
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    tiny = preset == "tiny"
    px = 32 * 32 if preset.startswith("qwen3") else 28 * 28  # pixels per merged token (patch 16 / 14, merge 2)
    c = ml_collections.ConfigDict()
    c.name = "sft" if not arg else f"sft_{preset}"
    c.stage = "sft"
    c.seed = 42
    # path None = the embedded tiny checkpoint; dtype: the compute dtype (and that of the frozen part).
    c.model = dict(
        path=ml_collections.config_dict.placeholder(str) if tiny else "",
        dtype="bfloat16",
        attn_impl="xla",
    )
    # jsonl: upstream's conversation file; image_root: its images (default: the file's directory).
    # max_len / max_patches: the largest bucket; longer samples are skipped and counted.
    # min_pixels / max_pixels: each image keeps its aspect ratio within this pixel budget (§5.3).
    # tfds_dirs: conversation datasets prepared by qzoom_jax.data.tfds_sft.build_conversations (images inside);
    # when given, jsonl is not read.
    c.data = {
        "jsonl": "",
        "tfds_dirs": (),
        "image_root": "",
        "max_len": 256 if tiny else 8192,
        "max_patches": 1024 if tiny else 16384,
        "max_images": 2 if tiny else 4,
        "min_pixels": 16 * 28 * 28 if tiny else 256 * px,
        "max_pixels": 64 * 28 * 28 if tiny else 1280 * px,
        "worker_count": 0 if tiny else 8,
        # "upstream": upstream's training template (§5.2: no system turn, a literal "<image>"); "inference": the
        # prompt the Q-Zoom engine serves (default system turn, images, then the question).
        "chat_format": "upstream",
        # packing: several samples per row (data/packing.py) up to max_len tokens and max_patches patch rows, at
        # most pack_images images a row; each sample keeps its own positions, attention and loss.
        "packing": False,
        "pack_images": 8 if tiny else 16,
    }
    c.train = {
        # Qwen3-VL-4B ties lm_head to the embedding (no lm_head leaf): model/ trains it
        "trainable": tuple(p for p in LLM_AND_MERGER if p != "lm_head/") if preset.startswith("qwen3")
        else LLM_AND_MERGER,
        "master_dtype": "float32",
        # remat policies of the decoder layers / the vision blocks: "none" | "full" (recompute all in the backward
        # pass) | "dots" (keep the weight matmuls' outputs) | "offload" (those, in host memory)
        # (the SFT trainer's remat does not run DeepStack yet: none on Qwen3-VL, else a ConfigError)
        "remat": "none" if tiny or preset.startswith("qwen3") else "full",
        "vision_remat": "none",
        "loss_chunk": 1024,  # lm_head + cross-entropy this many positions at a time
        "global_batch_size": 8 if tiny else 128,
        "accum_steps": 1 if tiny else 4,
        "num_epochs": 1,
        "num_steps": 0,
        "log_every": 1 if tiny else 10,
        "checkpoint_every": 50 if tiny else 500,
        "max_to_keep": 3,
    }
    c.optim = {
        "lr": 1e-4 if tiny else 1e-5,
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
