"""The whole pipeline end to end on the embedded tiny model, a few samples and one step per stage; every step is
skipped on a rerun.

The first run is a separate process on one CPU device (``python tests/test_pipeline.py WORKDIR``), as a user's
run would be: the test session's 8 host devices would only make every compilation slower."""

import json
import os
import subprocess
import sys

import pytest

from qzoom_jax import convert, evaluate, labels, pipeline, train
from qzoom_jax.assets.repo_configs import repo_config
from qzoom_jax.checkpoints import qzoom_checkpoint
from qzoom_jax.labelling import mining

ONE_STEP = (("train.num_steps", 1), ("train.global_batch_size", 4), ("train.checkpoint_every", 1))
OVERRIDES = (
    ("labels", "data.synthetic_num", 4), ("labels", "batch_size", 4), ("labels", "max_new_tokens", 2),
    ("labels", "grid", 8), ("sdrpn", "data.grid", 8),
    *(("sdrpn", k, v) for k, v in ONE_STEP),
    ("mining", "data.synthetic_num", 8), ("mining", "max_new_tokens", 2), ("mining", "batch_size", 8),
    *(("post_sft", k, v) for k, v in ONE_STEP),
    ("post_sft", "data.min_pixels", 16 * 784), ("post_sft", "data.max_pixels", 16 * 784),
    ("gate_answers", "data.synthetic_num", 48),
    *(("gate", k, v) for k, v in ONE_STEP),
    ("eval", "tasks.reading.limit", 1), ("eval", "sweep.baseline_budgets", (64,)), ("eval", "throughput_limit", 1),
    ("eval", "warmup_runs", 0), ("eval", "tasks.reading.max_new_tokens", 2),
)


def _regressions(cfg):
    """A judge that calls every direct answer right and every RoI answer wrong: the random tiny model has no
    real regressions, and stage 2 needs some to train on."""
    del cfg
    return lambda questions, references, candidates: ([True] * (len(candidates) // 2)
                                                      + [False] * (len(candidates) // 2))


def _first_run(workdir: str) -> dict:
    """The pipeline with the test's overrides and judge, in this process; returns its results."""
    cfg = repo_config("pipeline")
    cfg.overrides = OVERRIDES
    mining._metric_judge = _regressions
    return pipeline.main(cfg, workdir)


def test_pipeline_end_to_end_then_every_step_skipped(tmp_path, monkeypatch, capsys):
    cfg = repo_config("pipeline")
    cfg.overrides = OVERRIDES
    workdir = str(tmp_path / "run")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    subprocess.run([sys.executable, __file__, workdir], check=True, env=env)
    results = {name: json.load(open(os.path.join(workdir, name, pipeline.RECORD)))["result"]
               for name in pipeline.STEPS}
    assert results["mining"]["summary"]["regression"] == results["mining"]["summary"]["written"] == 8
    _, meta = qzoom_checkpoint.read_run(results["gate_stage2"]["run"])
    assert meta["backbone"] == results["post_sft"]["model"] and meta["twig_backbone"] == pipeline._Pipeline(
        cfg, workdir).base
    assert os.path.isfile(os.path.join(results["export"]["model"], "config.json"))
    text = open(os.path.join(workdir, "report.md")).read()
    for row in ("| base | qzoom | 64 |", "| base | baseline | 64 |", "| stage 2 | qzoom | 64 |",
                "| stage 2 | baseline | 64 |"):
        assert row in text, text
    assert "regressions 8" in text and os.path.getsize(os.path.join(workdir, "pareto.png")) > 0

    def refuse(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    capsys.readouterr()
    cfg.compilation_cache = False  # nothing compiles in this process (not a step's setting: still all done)
    with monkeypatch.context() as m:
        for module, name in ((train, "main"), (labels, "main"), (evaluate, "main"), (convert, "main")):
            m.setattr(module, name, refuse)
        again = pipeline.main(cfg, workdir)
    out = capsys.readouterr().out
    assert all(f"pipeline: {name} already done, skipped" in out for name in pipeline.STEPS)
    assert again == results


def test_an_unknown_override_is_a_config_error(tmp_path):
    cfg = repo_config("pipeline")
    cfg.overrides = (("sdprn", "train.num_steps", 1),)
    with pytest.raises(pipeline.ConfigError, match="unknown step 'sdprn'"):
        pipeline.main(cfg, str(tmp_path))


if __name__ == "__main__":
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    _first_run(sys.argv[1])
