"""Label generation. Stage 1 (presets ``tiny``, ``qwen2_5vl_3b``, ``qwen2_5vl_7b``, ``qwen3vl_4b``): the frozen teacher answers
every question on the square-padded 576-token image; the decode-step-averaged attention of the preset's
(layer, head) sets gives the grounding and sink maps (training reference §1.2). Stage 3 (presets ``gate_<preset>``):
the model answers every question at each budget of a token ladder (§4.1); the gate's labels are drawn from those
answers when training reads them (configs/gate.py).

    python -m qzoom_jax.labels --config=configs/labels.py                 # embedded tiny teacher, synthetic data
    python -m qzoom_jax.labels --config=configs/labels.py:qwen2_5vl_7b \\
        --config.model.path=/ckpt/Qwen2.5-VL-7B-Instruct \\
        --config.data.source=universal --config.data.jsonl=/data/stage1_universal.jsonl \\
        --config.data.image_root=/data --workdir=gs://bucket/runs/labels_7b
    python -m qzoom_jax.labels --config=configs/labels.py:gate_tiny       # stage-3 answers (legibility oracle)
    python -m qzoom_jax.labels --config=configs/labels.py:gate_qwen2_5vl_7b \\
        --config.model.path=/ckpt/Qwen2.5-VL-7B-Instruct \\
        --config.data.source=universal --config.data.jsonl=/data/stage3_universal.jsonl \\
        --config.data.image_root=/data --workdir=gs://bucket/runs/gate_answers_7b

Upstream's released pickles need no generation: point the training config at them instead
(``--config.data.pickle=.../qwen2_5vl_pseudo_7b_576res_185k.pkl`` in configs/sdrpn.py,
``--config.data.pickle=.../qwen2_5vl_7b_stage3.pkl`` in configs/gate.py).
"""

import ml_collections

# Teacher heads per backbone (training reference §1.2 step 6): {mode: {"grounding"/"sink": ((layer, head), ...)}}.
HEAD_TABLES = {
    "qwen2_5vl_3b": {
        "textual": {"grounding": ((20, 1), (20, 4), (22, 14)), "sink": ()},
        "natural": {"grounding": ((21, 9), (21, 11), (22, 0), (22, 7)), "sink": ((8, 1), (8, 13))},
    },
    "qwen2_5vl_7b": {
        "textual": {"grounding": ((22, 1), (22, 4), (23, 6), (23, 11)), "sink": ()},
        "natural": {"grounding": ((16, 1), (16, 7), (16, 17), (19, 17), (19, 20)), "sink": ((9, 4), (9, 22))},
    },
    # Qwen3-VL-4B: upstream's table (training reference §1.2 step 6); unmeasured here (no 4B run in this repo).
    "qwen3vl_4b": {
        "textual": {"grounding": ((19, 24), (19, 27), (24, 21), (24, 23)), "sink": ((24, 6), (24, 10))},
        "natural": {"grounding": ((20, 15), (20, 21), (20, 23), (21, 8), (21, 10), (21, 11)),
                    "sink": ((20, 1), (20, 24))},
    },
    # The embedded tiny teacher (random weights, see assets/make_tiny_checkpoint.py): heads whose averaged
    # attention, measured on 32 synthetic samples at the tiny preset's 16x16 grid, most often gives a valid label
    # map whose foreground touches the target region (5 of 6 valid maps for the best head of each mode).
    "tiny": {
        "textual": {"grounding": ((2, 1), (5, 1)), "sink": ()},
        "natural": {"grounding": ((1, 1), (2, 0)), "sink": ()},
    },
}


def teacher_config(preset: str) -> ml_collections.ConfigDict:
    """The label-generation settings; shared with configs/sdrpn.py, which runs them when it has no labels."""
    if preset not in HEAD_TABLES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(HEAD_TABLES)}")
    tiny = preset == "tiny"
    c = _common(tiny)
    c.stage = "sdrpn"
    # 576 merged tokens on the square-padded image (§1.2); the tiny default uses 256 so that it runs in minutes on
    # two CPU cores (the vision tower's full-attention blocks are quadratic in the patch count).
    c.grid = 16 if tiny else 24
    # Each record says how many tokens the teacher may generate (upstream: 128 by default); this caps it (None =
    # the records' own). The tiny teacher's answers are noise, so 32 keep the default quick.
    c.max_new_tokens = 32 if tiny else ml_collections.config_dict.placeholder(int)
    # "upstream": the label script's text (system prompt + a literal "<image>" before the image block);
    # "inference": the evaluation format (reference §8 #6). configs/sdrpn.py has the same choice for the student.
    c.chat_format = "upstream"
    # The teacher's image resize: "fast" is transformers' torchvision processor, as upstream's label script uses.
    c.resize = "fast"
    c.batch_size = 16 if tiny else 8  # per process
    c.part_size = 128 if tiny else 4096  # records per output dataset part: the unit of resumption
    c.heads = HEAD_TABLES[preset]
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    return c


def answers_config(preset: str) -> ml_collections.ConfigDict:
    """The stage-3 answer-generation settings; shared with configs/gate.py, which runs them when it has no labels."""
    if preset not in HEAD_TABLES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(HEAD_TABLES)}")
    tiny = preset == "tiny"
    c = _common(tiny)
    c.stage = "gate"
    # "model": the model answers (upstream ran the base model, §4.1). "oracle": synthetic.legibility_answers, only
    # for the tiny preset, whose random-weight model cannot answer (its answers would all be filtered out).
    c.answers = "oracle" if tiny else "model"
    c.oracle_min_px = 3.5  # target short side (px, as the model sees it) from which the oracle reads it
    # Merged visual tokens per image, increasing: the ladder inferred for the paper (§4.1); a small one for the
    # tiny default so that gate training on it takes minutes on two CPU cores.
    c.budgets = (16, 32, 64, 128) if tiny else (64, 128, 256, 512)
    c.max_new_tokens = 8 if tiny else 32  # short answers: a word or a phrase
    c.batch_size = 16 if tiny else 8  # per process
    c.part_size = 128 if tiny else 4096  # records per output dataset part: the unit of resumption
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    return c


def _common(tiny: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = {
        "path": ml_collections.config_dict.placeholder(str) if tiny else "",
        "dtype": "float32" if tiny else "bfloat16",
        "attn_impl": "xla",
    }
    # source: "synthetic" (procedural, embedded default), "reading" (the reading task, data/reading.py),
    # "universal" (upstream JSONL + image root) or "tfds" (prepared stage-1 input datasets, a list of
    # directories). synthetic_num / synthetic_seed: the procedural sources' sample count and set; reading_kind:
    # "read", "count" or "" (both, alternating).
    c.data = {
        "source": "synthetic" if tiny else "universal",
        "synthetic_num": 256,
        "synthetic_seed": 0,
        "reading_kind": "",
        "jsonl": "",
        "image_root": "",
        "tfds_dirs": (),
    }
    return c


def get_config(arg=None):
    preset = arg or "tiny"
    if preset.startswith("post_sft_"):
        c = mining_config(preset[len("post_sft_"):])
    elif preset.startswith("gate_"):
        c = answers_config(preset[len("gate_"):])
    else:
        c = teacher_config(preset)
    c.name = "labels" if not arg else f"labels_{arg}"
    return c


def mining_config(preset: str) -> ml_collections.ConfigDict:
    """Stage-2 mining (training reference §2.1; ``qzoom_jax/labelling/mining.py``): presets ``post_sft_tiny``
    (the embedded tiny Q-Zoom checkpoint: its backbone answers directly, with its twig through the RoI; the
    reading task, exact match), ``post_sft_qwen2_5vl_3b`` / ``_7b`` (name the backbone and the stage-1 run)::

        python -m qzoom_jax.labels --config=configs/labels.py:post_sft_tiny
        python -m qzoom_jax.labels --config=configs/labels.py:post_sft_qwen2_5vl_7b \\
            --config.model.path=/ckpt/Qwen2.5-VL-7B-Instruct --config.twig_run=gs://bucket/runs/sdrpn_7b \\
            --config.data.jsonl=/data/stage2_universal.jsonl --config.data.image_root=/data \\
            --config.judge.kind=llm --workdir=gs://bucket/runs/mining_7b
    """
    if preset not in HEAD_TABLES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(HEAD_TABLES)}")
    from qzoom_jax.checkpoints.embedded import EMBEDDED_QZOOM

    tiny = preset == "tiny"
    c = _common(tiny)
    c.stage = "post_sft"
    # model.path: the base model (direct answers). twig_run: the stage-1 run whose twig, on the same backbone,
    # gives the RoI answers ("" = the twig of model.path, a Q-Zoom checkpoint). roi_model: another checkpoint for
    # the RoI answers instead (HF Q-Zoom directory or a run; "" = model.path + twig_run, loaded once).
    if tiny:
        c.model.path = EMBEDDED_QZOOM
        c.data.source = "reading"
        c.data.synthetic_num = 32
    c.twig_run = ""
    c.roi_model = ""
    # Both answer at this budget (merged tokens, min and max): 576 = stage 2's training resolution (§2.2).
    c.min_tokens = 64 if tiny else 576
    c.max_tokens = 64 if tiny else 576
    c.roi_threshold = ml_collections.config_dict.placeholder(float)  # None: the checkpoint's roi_conf_thresh
    c.max_new_tokens = 8 if tiny else 64
    # kind "metric": metric (exact | anls | relaxed | vqa) against the annotation, right at >= pass_score;
    # "llm": the model at judge.model ("" = the backbone itself, as upstream) answers a yes/no prompt, batched.
    c.judge = {"kind": "metric", "metric": "exact", "pass_score": 0.5, "model": "", "batch_size": 8,
               "max_new_tokens": 4}
    c.use_gt = False  # supervise the annotation instead of the base model's own response
    c.mixing_ratio = 0.0  # both-right samples added per regression (upstream's example: 0)
    c.seed = 0
    c.batch_size = 8
    c.part_size = 128 if tiny else 4096
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    return c
