"""Label runs — ``python -m qzoom_jax.labels --config=configs/labels.py[:preset]``.

* default presets: stage-1 pseudo-labels from the frozen teacher's attention (``labelling/teacher.py``);
* ``gate_<preset>``: stage-3 answers of every question at each token budget (``labelling/gate_labels.py``).

Output: ``WORKDIR/labels/``, TFDS ArrayRecord datasets in resumable parts (``labelling/parts.py``).
"""

from __future__ import annotations

import os

from qzoom_jax.labelling import gate_labels, teacher
from qzoom_jax.runtime import cli, distributed, workdir as workdir_lib


def main(cfg, workdir: str) -> None:
    """Stage-1 pseudo-labels, or stage-3 multi-resolution answers for a ``stage="gate"`` config; the workdir is
    locked for the run (``runtime.workdir``)."""
    generate = gate_labels.generate_answers if cfg.get("stage", "sdrpn") == "gate" else teacher.generate_labels
    with workdir_lib.lock(workdir):
        parts = generate(cfg, workdir)
    distributed.print0(f"{len(parts)} label dataset part(s) under {os.path.join(workdir, 'labels')}")


if __name__ == "__main__":
    cli.run(main, "configs/labels.py", "label-generation")
