"""TrainCheckpointer: bit-exact state round trip onto requested shardings, grain iterator resume, step policy,
meta, and an interrupted save that must never be taken for the latest checkpoint (8 host devices, conftest.py)."""

import os
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qzoom_jax.training.checkpoint import TrainCheckpointer


def _train_state(mesh):
    """params + multi_transform(AdamW | set_to_zero) state after two updates + step, sharded over `mesh`."""
    rng = np.random.default_rng(0)
    params = {
        "twig": {"kernel": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32), "bias": jnp.zeros((6,))},
        "backbone": {"embedding": jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16)},
    }
    labels = {"twig": {"kernel": "train", "bias": "train"}, "backbone": {"embedding": "frozen"}}
    tx = optax.multi_transform({"train": optax.adamw(1e-2), "frozen": optax.set_to_zero()}, labels)
    opt_state = tx.init(params)
    for _ in range(2):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    state = {"params": params, "opt_state": opt_state, "step": jnp.int32(2)}
    return jax.tree.map(lambda x: jax.device_put(x, _sharding(mesh, x)), state)


def _sharding(mesh, x):
    # Shard the leading dimension where it divides, replicate the rest (scalars, the optimizer count).
    spec = P("d") if x.ndim and x.shape[0] % mesh.size == 0 else P()
    return NamedSharding(mesh, spec)


def _abstract(state, mesh):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_sharding(mesh, x)), state)


def _batches(ds_iter, n):
    return [next(ds_iter) for _ in range(n)]


def _dataset():
    return grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset()


def test_state_round_trip_is_bit_identical_on_the_requested_shardings(tmp_path):
    state = _train_state(jax.make_mesh((4,), ("d",), devices=jax.devices()[:4]))
    ckpt = TrainCheckpointer(tmp_path, save_interval_steps=2)
    assert ckpt.save(2, state)
    ckpt.wait()

    # Restore onto a different topology: 2 devices instead of the 4 it was saved from.
    mesh2 = jax.make_mesh((2,), ("d",), devices=jax.devices()[4:6])
    abstract = _abstract(state, mesh2)
    restored = ckpt.restore(2, abstract)
    ckpt.close()

    # Same pytree: the optax namedtuples, MaskedNode leaves of the frozen partition and EmptyStates included.
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    masked = restored["opt_state"].inner_states["train"].inner_state[0].mu["backbone"]["embedding"]
    assert isinstance(masked, optax.MaskedNode)
    for (path, got), want, target in zip(
        jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(state), jax.tree.leaves(abstract)
    ):
        assert got.dtype == want.dtype, path
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), path
        assert got.sharding == target.sharding, path
    assert restored["params"]["twig"]["kernel"].sharding.spec == P("d")


def test_data_iterator_resumes_at_the_saved_position(tmp_path):
    state = {"step": jnp.int32(0)}
    ckpt = TrainCheckpointer(tmp_path, save_interval_steps=1)
    it = iter(_dataset())
    _batches(it, 3)
    assert ckpt.save(3, state, data_iterator=it)
    # The save is asynchronous; advancing the iterator now must not change what was saved.
    expected = _batches(it, 5)
    ckpt.wait()

    fresh = iter(_dataset())
    assert not np.array_equal(next(iter(_dataset())), expected[0])  # so the comparison below can fail
    ckpt.restore(3, jax.eval_shape(lambda: state), data_iterator=fresh)
    ckpt.close()
    for got, want in zip(_batches(fresh, 5), expected):
        np.testing.assert_array_equal(got, want)


def test_save_interval_max_to_keep_and_final_force(tmp_path):
    state = {"w": jnp.arange(4.0), "step": jnp.int32(0)}
    ckpt = TrainCheckpointer(tmp_path, save_interval_steps=2, max_to_keep=2)
    saved = [step for step in range(1, 8) if ckpt.save(step, state)]
    assert saved == [2, 4, 6]
    assert ckpt.save(7, state, force=True)  # the final step, off the interval
    assert not ckpt.save(7, state, force=True)  # already there: a no-op, not an error
    ckpt.wait()
    assert ckpt.latest_step() == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["6", "7"]
    ckpt.close()
    # A new checkpointer (a resumed run) finds the same steps.
    again = TrainCheckpointer(tmp_path, save_interval_steps=2, max_to_keep=2)
    assert again.latest_step() == 7
    again.close()


def test_meta_round_trip_is_a_snapshot(tmp_path):
    meta = {"config": {"lr": 1e-4, "twig_K": [18, 3]}, "backbone_checkpoint": "gs://bucket/Qwen2.5-VL-3B"}
    ckpt = TrainCheckpointer(tmp_path, save_interval_steps=1)
    assert ckpt.save(1, {"step": jnp.int32(1)}, meta=meta)
    meta["config"]["lr"] = 0.5  # edited after save(): must not reach the checkpoint
    ckpt.wait()
    assert ckpt.read_meta(1) == {
        "config": {"lr": 1e-4, "twig_K": [18, 3]},
        "backbone_checkpoint": "gs://bucket/Qwen2.5-VL-3B",
    }
    with pytest.raises(TypeError, match="JSON"):
        ckpt.save(2, {"step": jnp.int32(2)}, meta={"mesh": object()})
    with pytest.raises(KeyError, match="data"):
        ckpt.restore(1, {"step": jax.ShapeDtypeStruct((), jnp.int32)}, data_iterator=iter(_dataset()))
    ckpt.close()


def test_interrupted_save_is_never_the_latest(tmp_path):
    # A process saves step 2 completely, starts the asynchronous save of step 4 and dies before it is finalized.
    script = textwrap.dedent(f"""
        import os, time
        import jax.numpy as jnp
        from qzoom_jax.training.checkpoint import TrainCheckpointer
        ckpt = TrainCheckpointer({str(tmp_path)!r}, save_interval_steps=2)
        state = {{"w": jnp.full((2048, 2048), 1.0), "step": jnp.int32(2)}}
        ckpt.save(2, state)
        ckpt.wait()
        ckpt.save(4, {{"w": state["w"] * 2, "step": jnp.int32(4)}})
        for _ in range(6000):  # the save runs in the background: die once it has started writing
            if os.path.isdir(os.path.join({str(tmp_path)!r}, "4.orbax-checkpoint-tmp")):
                break
            time.sleep(0.01)
        os._exit(1)
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert (tmp_path / "4.orbax-checkpoint-tmp").is_dir()  # the half-written step is on disk ...

    ckpt = TrainCheckpointer(tmp_path, save_interval_steps=2)
    assert ckpt.latest_step() == 2  # ... but never listed
    abstract = {"w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    restored = ckpt.restore(2, abstract)
    assert float(restored["w"][0, 0]) == 1.0 and int(restored["step"]) == 2
    # The resumed run reaches step 4 again and saves over the leftover.
    assert ckpt.save(4, {"w": restored["w"] * 2, "step": jnp.int32(4)})
    ckpt.wait()
    assert ckpt.latest_step() == 4
    assert int(ckpt.restore(4, abstract)["step"]) == 4
    ckpt.close()


def test_relative_directory_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = TrainCheckpointer("runs/x/checkpoints", save_interval_steps=1)
    ckpt.save(1, {"w": jnp.ones((2,))})
    ckpt.wait()
    assert ckpt.directory == tmp_path / "runs/x/checkpoints" and ckpt.latest_step() == 1
    ckpt.close()
