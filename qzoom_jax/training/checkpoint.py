"""Training checkpoints: Orbax ``CheckpointManager``, saved asynchronously, safe on one CPU and on a pod.

Each step directory holds up to three items:

* ``state`` — the trainable pytree (``{"params", "opt_state", "step"}``), written with ``StandardSave`` and read
  back with ``StandardRestore`` against an abstract target, so optax namedtuples, ``MaskedNode``s and empty
  tuples come back as they went in and every array lands on the ``NamedSharding`` the target asks for;
* ``data`` — the grain iterator position, one small JSON file per process (grain's own Orbax handler);
* ``meta`` — JSON: the config, the path of the frozen backbone checkpoint (referenced, never copied), ...

Every process calls :meth:`TrainCheckpointer.save` and :meth:`TrainCheckpointer.restore`; Orbax synchronises the
processes and writes each array shard from the host that owns it. Each process has its own data position, so a
run resumes its ``data`` item only with the same number of processes. A save is written under
``<step>.orbax-checkpoint-tmp`` and renamed to ``<step>`` (on GCS: marked with ``commit_success.txt``) only once
every item of every process is on disk, so an interrupted save is never listed as a step and a resumed run
starts from the last complete one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

# Both kinds of grain iterator: `grain.MapDataset(...).to_iter_dataset()` and `grain.DataLoader`.
DataIterator = grain.DatasetIterator | grain.DataLoaderIterator


class TrainCheckpointer:
    """Saves and restores ``state`` (+ grain iterator, + JSON meta) every ``save_interval_steps`` steps.

    ``directory`` is a local path or ``gs://...``; with several processes, one place all of them see (a bucket or
    a shared file system: each process writes its own shards and data position there). Call :meth:`save` every
    step and let it decide: besides the interval it saves at a preemption notice. Saves run in the background:
    :meth:`save` returns once the arrays are copied off the devices; call :meth:`wait` before reading a fresh
    checkpoint back and :meth:`close` at the end of the run.
    """

    def __init__(self, directory: epath.PathLike, *, save_interval_steps: int, max_to_keep: int = 3):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        path = epath.Path(directory)
        # Orbax's TensorStore writer needs an absolute path; a relative one means "under the current directory".
        self.directory = path if "://" in os.fspath(directory) else epath.Path(os.path.abspath(path))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=True,
            # Every `save_interval_steps`, plus a save at the step the cluster agrees on when a preemption notice
            # arrives (Cloud TPU maintenance), so a preempted run loses nothing. Orbax's default policy would
            # also save the very first step it sees; an explicit policy keeps "multiples of the interval" exact.
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(save_interval_steps), policies.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=policies.LatestN(max_to_keep),
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint, or None. Half-written (temporary) step directories are never listed."""
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: DataIterator | None = None,
        meta: dict[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Starts saving ``step`` if it is a multiple of the interval (or ``force``); returns whether it did.

        ``force=True`` is for the final step; it is a no-op when that step is already saved.
        """
        if force and step in self._manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            # grain's handler is synchronous: the iterator position is read now, not when the background write
            # runs, so the caller may keep iterating as soon as save() returns.
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(_json_snapshot(meta))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: DataIterator | None = None) -> Any:
        """Returns the state of ``step``; arrays get the dtype, shape and ``.sharding`` of ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings, e.g.
        ``jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), jax.eval_shape(init),
        shardings)``. A ``data_iterator`` passed here is moved, in place, to the saved position. A missing step
        raises ``FileNotFoundError``, a missing item (``data``, ``meta``) ``KeyError`` (Orbax names both).
        """
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON ``meta`` saved with ``step``."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        """Blocks until the background save (if any) is finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's threads."""
        self._manager.close()


def _json_snapshot(meta: dict[str, Any]) -> dict[str, Any]:
    # The JSON handler serialises in the background thread: take a copy now so later edits to `meta` are not
    # written, and so a value that is not JSON fails here, in the caller, instead of in that thread.
    try:
        return json.loads(json.dumps(meta))
    except TypeError as e:
        raise TypeError(f"checkpoint meta must be JSON-serialisable: {e}") from e
