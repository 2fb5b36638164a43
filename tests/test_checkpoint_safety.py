"""Reading checkpoints is safe: broken weights fail at load naming the file and tensor, reading a run writes
nothing to it, and a directory replaced with ``atomic.replacing`` is never seen half written."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qzoom_jax.checkpoints import atomic, orbax_params, qzoom_checkpoint
from qzoom_jax.checkpoints.embedded import EMBEDDED_TINY
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.models.qzoom import twig
from qzoom_jax.runtime.errors import CheckpointError
from qzoom_jax.training.checkpoint import TrainCheckpointer

K, T = 3, 2


@pytest.fixture(scope="module")
def backbone():
    return load_pretrained(EMBEDDED_TINY)


def _with_leaf(params, path, value):
    """``params`` with the leaf at ``path`` (a tuple of keys) replaced."""
    if not path:
        return value
    return {**params, path[0]: _with_leaf(params[path[0]], path[1:], value)}


# ---------------------------------------------------------------------------- our Orbax model directory
def test_orbax_model_directory_rejects_non_finite_and_integer_weights(backbone, tmp_path):
    norm = ("model", "norm", "scale")
    scale = backbone.params["model"]["norm"]["scale"]
    nan = orbax_params.save(_with_leaf(backbone.params, norm, scale.at[7].set(jnp.nan)), backbone.config,
                            tmp_path / "nan")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(nan)
    assert str(e.value) == f"{nan}/params: tensor 'model/norm/scale' holds non-finite values (NaN or inf)"

    integer = orbax_params.save(_with_leaf(backbone.params, norm, jnp.ones(scale.shape, jnp.int8)),
                                backbone.config, tmp_path / "int8")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(integer, dtype="bfloat16")
    assert str(e.value) == f"{integer}/params: tensor 'model/norm/scale' has dtype int8, expected floating-point weights"
    cast = load_pretrained(integer, cast_non_float=True)
    assert cast.params["model"]["norm"]["scale"].dtype == jnp.float32
    np.testing.assert_array_equal(cast.params["model"]["norm"]["scale"], np.ones(scale.shape))


def test_orbax_model_directory_converts_bf16_and_fp32(backbone, tmp_path):
    bf16 = orbax_params.save(jax.tree.map(lambda x: x.astype(jnp.bfloat16), backbone.params), backbone.config,
                             tmp_path / "bf16")
    loaded = load_pretrained(bf16, dtype="float32")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(loaded.params))
    back = load_pretrained(bf16, dtype="bfloat16")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b)),
                 loaded.params, back.params)


# ---------------------------------------------------------------------------- training runs
def fake_run(directory, params, stage="sdrpn", **meta) -> str:
    """A training run directory holding one checkpoint of ``params`` (a stage-1 twig on the embedded default by
    default), as training writes it; no training needed."""
    ckpt = TrainCheckpointer(directory / "checkpoints", save_interval_steps=1)
    ckpt.save(1, {"params": params, "step": jnp.int32(1)},
              meta={"stage": stage, "K": K, "T": T, "backbone": EMBEDDED_TINY, **meta}, force=True)
    ckpt.close()
    return str(directory)


def _tree_files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, name), root) for d, dirs, files in os.walk(root)
                  for name in dirs + files)


def test_a_run_is_read_without_writing_and_its_branch_is_checked(backbone, tmp_path):
    good = twig.init_twig_params(backbone.params["model"]["layers"], K, T)
    run = fake_run(tmp_path / "sdrpn", good)
    before = {path: os.path.getmtime(os.path.join(run, path)) for path in _tree_files(run)}
    parts = qzoom_checkpoint.load(EMBEDDED_TINY, twig_run=run)
    assert parts.K == K
    jax.tree.map(np.testing.assert_array_equal, parts.twig, good)
    assert {path: os.path.getmtime(os.path.join(run, path)) for path in _tree_files(run)} == before

    kernel = ("mlp", "up_proj", "kernel")
    bad = fake_run(tmp_path / "nan", _with_leaf(good, kernel, good["mlp"]["up_proj"]["kernel"].at[1, 0, 0].set(jnp.inf)))
    with pytest.raises(CheckpointError) as e:
        qzoom_checkpoint.load(EMBEDDED_TINY, twig_run=bad)
    assert str(e.value) == f"{bad}/checkpoints/1/state: tensor 'mlp/up_proj/kernel' holds non-finite values (NaN or inf)"
    integer = fake_run(tmp_path / "int", _with_leaf(good, kernel, jnp.zeros(good["mlp"]["up_proj"]["kernel"].shape, jnp.int32)))
    with pytest.raises(CheckpointError) as e:
        qzoom_checkpoint.load(EMBEDDED_TINY, twig_run=integer)
    assert str(e.value) == (f"{integer}/checkpoints/1/state: tensor 'mlp/up_proj/kernel' has dtype int32, expected "
                            "floating-point weights")


def test_a_missing_run_is_an_error_and_nothing_is_created(tmp_path):
    missing = str(tmp_path / "no_run")
    with pytest.raises(CheckpointError) as e:
        qzoom_checkpoint.load(EMBEDDED_TINY, twig_run=missing)
    assert str(e.value) == f"no training run at {missing} (no {missing}/checkpoints)"
    with pytest.raises(CheckpointError) as e:
        qzoom_checkpoint.load(missing)
    assert str(e.value) == f"no checkpoint at {missing} (expected a model directory or a training run)"
    assert os.listdir(tmp_path) == []
    # A run directory without any finished checkpoint: named, and still nothing written into it.
    os.makedirs(tmp_path / "empty" / "checkpoints")
    with pytest.raises(CheckpointError) as e:
        qzoom_checkpoint.read_run(str(tmp_path / "empty"))
    assert str(e.value) == f"{tmp_path}/empty: no finished checkpoint under {tmp_path}/empty/checkpoints"
    assert _tree_files(tmp_path) == ["empty", "empty/checkpoints"]


# ---------------------------------------------------------------------------- atomic.replacing
def _write(directory, files: dict) -> None:
    for name, text in files.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)


def _contents(directory) -> dict:
    return {name: open(os.path.join(directory, name)).read() for name in sorted(os.listdir(directory))}


def test_replacing_swaps_in_the_complete_directory(tmp_path):
    final = tmp_path / "out"
    with atomic.replacing(final) as tmp:
        assert tmp == f"{final}.tmp-{os.getpid()}" and os.listdir(tmp) == [] and not final.exists()
        _write(tmp, {"a": "1", "b": "1"})
    assert _contents(final) == {"a": "1", "b": "1"}
    with atomic.replacing(final) as tmp:
        _write(tmp, {"a": "2"})
        assert _contents(final) == {"a": "1", "b": "1"}  # readers still see the old one, whole
    assert _contents(final) == {"a": "2"}  # the new one, whole: no file of the old one is left over
    assert os.listdir(tmp_path) == ["out"]


def test_replacing_keeps_the_old_directory_when_the_writer_fails(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    _write(final, {"a": "old"})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.replacing(final) as tmp:
            _write(tmp, {"a": "new", "b": "new"})
            raise RuntimeError("disk full")
    assert _contents(final) == {"a": "old"} and os.listdir(tmp_path) == ["out"]
