"""Write the embedded Q-Zoom default (``assets/tiny_qzoom``) that ``qzoom_jax.infer`` and ``qzoom_jax.evaluate``
run on when no checkpoint is given.

    python -m qzoom_jax.assets.make_tiny_qzoom [--workdir DIR]     # from a clone (reads configs/), a few minutes

It runs the two training stages on the embedded tiny backbone with their default (tiny) configs -- stage 1
(``configs/sdrpn.py``: teacher labels on synthetic images, then the twig) and stage 3 (``configs/gate.py``: the
gate) -- and writes the result as one Hugging Face directory: the backbone, ``model.twig_layers.*``,
``model.high_res_layers.*``, ``model.high_res_head.*`` and the Q-Zoom keys in config.json, as upstream releases
its checkpoints. Positions use mode (b) (``reuse_src_pos=false``): the backbone was never post-trained on RoI
inputs (no stage 2), so its RoI tokens get the positions of an ordinary second image.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from qzoom_jax.checkpoints import embedded, qzoom_checkpoint
from qzoom_jax import train
from qzoom_jax.assets.repo_configs import repo_config


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where the two training runs go (default: a temporary dir)")
    p.add_argument("--out", default=embedded.EMBEDDED_QZOOM)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        sdrpn_run, gate_run = os.path.join(workdir, "sdrpn"), os.path.join(workdir, "gate")
        train.main(repo_config("sdrpn"), sdrpn_run)
        gate = repo_config("gate")
        gate.model.twig_run = sdrpn_run
        train.main(gate, gate_run)
        parts = qzoom_checkpoint.load(gate_run, dtype="float32", reuse_src_pos=False)
        parts.backbone_path = embedded.EMBEDDED_DEFAULT  # tokenizer/processor files come from here
        qzoom_checkpoint.save_hf(parts, args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
