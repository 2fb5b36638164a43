"""The whole paper pipeline, one command: labels -> stage 1 -> mining -> stage 2 -> stage-3 answers -> stage 3
(on the base and on the stage-2 model) -> evaluation sweeps -> export, then report.md and pareto.png.

    python -m qzoom_jax.pipeline --config=configs/pipeline.py                  # tiny: the embedded defaults
    python -m qzoom_jax.pipeline --config=configs/pipeline.py:qwen2_5vl_7b \\
        --config.model.path=/ckpt/Qwen2.5-VL-7B-Instruct --workdir=gs://bucket/runs/pipeline_7b \\
        --config.overrides="(('labels', 'data.jsonl', '/data/stage1_universal.jsonl'), ...)"

Each step runs an existing entry point's ``main()`` on the named preset of its config file (so a change to, say,
configs/sdrpn.py's ``tiny`` preset is what the pipeline runs), with the pipeline's paths filled in; ``overrides``
are (step, dotted key, value) triples applied on top, e.g. ``('sdrpn', 'train.num_steps', 100)``. Steps:
labels, sdrpn, mining, post_sft, gate_answers, gate_base, gate_stage2, eval_base, eval_stage2, export.
"""

import ml_collections

PRESETS = ("tiny", "qwen2_5vl_3b", "qwen2_5vl_7b")


def get_config(arg=None):
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    c = ml_collections.ConfigDict()
    c.name = "pipeline" if not arg else f"pipeline_{preset}"
    # The base model of every step; None = each preset's own (the tiny presets: the embedded default).
    c.model = {"path": ml_collections.config_dict.placeholder(str)}
    # (config file, preset) of every step, by name.
    c.presets = {
        "labels": ("labels", preset),                # stage-1 teacher labels
        "sdrpn": ("sdrpn", preset),                  # stage 1
        "mining": ("labels", f"post_sft_{preset}"),  # stage-2 mining
        "post_sft": ("post_sft", preset),            # stage 2
        "gate_answers": ("labels", f"gate_{preset}"),  # stage-3 answers
        "gate": ("gate", preset),                    # stage 3 (gate_base and gate_stage2)
        "eval": ("eval", preset),                    # eval_base and eval_stage2, with --sweep
    }
    c.overrides = ()  # (step, "dotted.key", value): step is a key of presets, or gate_base / eval_stage2 ...
    c.export_dtype = "float32" if preset == "tiny" else "bfloat16"
    c.compilation_cache = True  # JAX's persistent compilation cache in WORKDIR/jax_cache
    return c
