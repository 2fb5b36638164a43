"""Label runs — ``python -m qzoom_jax.labels --config=configs/labels.py[:preset]``.

* default presets: stage-1 pseudo-labels from the frozen teacher's attention (``labelling/teacher.py``);
* ``gate_<preset>``: stage-3 answers of every question at each token budget (``labelling/gate_labels.py``);
* ``post_sft_<preset>``: stage-2 mining, the regressions of the RoI model as an SFT JSONL (``labelling/mining.py``).

Output: ``WORKDIR/labels/``, TFDS ArrayRecord datasets in resumable parts (``labelling/parts.py``).
"""

from __future__ import annotations

import os

from qzoom_jax.labelling import gate_labels, mining, teacher
from qzoom_jax.runtime import cli, distributed, workdir as workdir_lib


GENERATORS = {"sdrpn": teacher.generate_labels, "gate": gate_labels.generate_answers, "post_sft": mining.mine}


def main(cfg, workdir: str) -> None:
    """Stage-1 pseudo-labels, stage-3 multi-resolution answers (``stage="gate"``) or stage-2 mining
    (``stage="post_sft"``); the workdir is locked for the run (``runtime.workdir``)."""
    generate = GENERATORS[cfg.get("stage", "sdrpn")]
    with workdir_lib.lock(workdir):
        parts = generate(cfg, workdir)
    distributed.print0(f"{len(parts)} label dataset part(s) under {os.path.join(workdir, 'labels')}")


if __name__ == "__main__":
    cli.run(main, "configs/labels.py", "label-generation")
