"""Stage 2 -- targeted post-SFT: the LLM (decoder layers + lm_head) fine-tuned on its mined regressions with the
stage-1 twig's RoI crop spliced into every sample in the loop (training reference §2.3-§2.4).

    python -m qzoom_jax.train --config=configs/post_sft.py --config.data.jsonl=runs/mining/post_sft.jsonl  # tiny
    python -m qzoom_jax.train --config=configs/post_sft.py:qwen2_5vl_7b \\
        --config.model.path=/ckpt/Qwen2.5-VL-7B-Instruct --config.model.twig_run=gs://bucket/runs/sdrpn_7b \\
        --config.data.jsonl=/data/qwen2_5vl_7b_stage2.jsonl --config.data.image_root=/data \\
        --workdir=gs://bucket/runs/post_sft_7b

``data.jsonl``: upstream's stage-2 conversation JSONL (the released ``qwen2_5vl_7b_stage2.jsonl`` as it is, or
``python -m qzoom_jax.labels --config=configs/labels.py:post_sft_<preset>``'s output); one image per sample.
The twig: ``model.twig_run`` (a stage-1 run, usually trained on this same backbone), else the branch of a Q-Zoom
checkpoint given as ``model.path`` (the tiny default: the embedded tiny Q-Zoom checkpoint); neither is an error
naming the missing branch. The run's checkpoint is an SFT checkpoint (trained leaves over the backbone):
``qzoom_jax.checkpoints.sft_run.export`` writes the stage-2 model as a Hugging Face directory.

``train.trainable``: decoder layers and lm_head (§2.4); the vision tower, the merger, the embeddings, the final
norm and the twig stay frozen. ``train.tied_embeddings`` for a checkpoint whose lm_head is its input embedding
(Qwen2.5-VL-3B): "train" trains the shared matrix (what upstream's unfreezing of lm_head does there), "freeze"
keeps it (then only the decoder layers train). ``train.roi_threshold``: the blurred RoI probability a cell must
exceed (0.1, upstream's training default). Metrics add the step-time split (``time_roi_s``, ``time_crop_s``,
``time_step_s``) and ``roi_rate`` (the share of supervised samples that got a RoI). ``train.add_noise_to_roi``:
replace the predicted box by a random one 80 % of the time (on in the qwen3vl_4b preset, as upstream's Qwen3-VL
stage 2; its Qwen2.5-VL code ignores the flag).
"""

from qzoom_jax.assets.repo_configs import config_module
from qzoom_jax.checkpoints.embedded import EMBEDDED_QZOOM

PRESETS = ("tiny", "qwen2_5vl_3b", "qwen2_5vl_7b", "qwen3vl_4b")
PIXELS = 451584  # 576 merged tokens: stage 2's min = max pixels (§2.2)
# Qwen3-VL: 576 merged tokens of 32 px (inferred: upstream's Qwen3 stage-2 script is not in the reference; stage
# 2.5 uses this budget, §3).
QWEN3_PIXELS = 576 * 32 * 32


def get_config(arg=None):
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    tiny = preset == "tiny"
    qwen3 = preset.startswith("qwen3")
    pixels = QWEN3_PIXELS if qwen3 else PIXELS
    c = config_module("sft", beside=__file__).get_config(preset)
    c.name = "post_sft" if not arg else f"post_sft_{preset}"
    c.stage = "post_sft"
    c.model.path = EMBEDDED_QZOOM if tiny else ""
    c.model.twig_run = ""  # a stage-1 run directory; "" = the twig of model.path
    # The loader's examples hold one image; the spliced sequence adds the crop (max_len / max_patches bound it:
    # a RoI that does not fit leaves its sample unsupervised, counted in roi_over_length).
    c.data.update(
        max_images=1,
        min_pixels=64 * 28 * 28 if tiny else pixels,
        max_pixels=64 * 28 * 28 if tiny else pixels,
        max_len=512 if tiny else 8192,
        max_patches=1024 if tiny else 8192,
        crop_workers=2 if tiny else 8,  # host threads for the crops and the splice
    )
    c.train.update(
        trainable=("model/layers/", "lm_head/"),
        tied_embeddings="train",
        roi_threshold=0.1,
        # Random RoI boxes 80 % of the time (§2.3): upstream's Qwen3-VL stage 2 does it; its Qwen2.5-VL code
        # ignores the flag its script passes.
        add_noise_to_roi=qwen3,
        # The SFT trainer's remat does not run DeepStack yet (a ConfigError on Qwen3-VL): none there.
        remat="none" if tiny or qwen3 else "full",
        global_batch_size=8 if tiny else 64,
        accum_steps=1 if tiny else 8,
        num_epochs=1,
        num_steps=0,
    )
    c.optim.update(lr=1e-5 if tiny else 1e-6, warmup_ratio=0.03, weight_decay=0.0, clip_norm=1.0)
    return c
