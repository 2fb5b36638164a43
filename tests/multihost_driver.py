"""The command line of ``python -m qzoom_jax.train``, run by tests/test_multihost.py in each of its processes.

Before training, every process asks for the teacher's input dataset (``teacher.input_datasets``), which process 0
builds while the others wait. ``QZOOM_TEST_STOP_AFTER=N`` stops every process once step N is logged, after the
checkpoint before it is complete -- a preemption without the notice -- so the same command resumes the run.
"""

import os
import sys

from qzoom_jax.training import checkpoint
from qzoom_jax.runtime import cli
from qzoom_jax.labelling import teacher
from qzoom_jax import train

STOPPED = 3  # exit status of a stopped run


def stop_after(last_step: int) -> None:
    save = checkpoint.TrainCheckpointer.save

    def save_then_stop(self, step, *args, **kwargs):
        saved = save(self, step, *args, **kwargs)
        if step == last_step:
            self.wait()  # every process: the latest checkpoint is committed
            sys.exit(STOPPED)
        return saved

    checkpoint.TrainCheckpointer.save = save_then_stop


def main(cfg, workdir):
    teacher.input_datasets(cfg.teacher.data, os.path.join(workdir, "data"))
    return train.main(cfg, workdir)


if __name__ == "__main__":
    if os.environ.get("QZOOM_TEST_STOP_AFTER"):
        stop_after(int(os.environ["QZOOM_TEST_STOP_AFTER"]))
    cli.run(main, "configs/sdrpn.py", "training")
