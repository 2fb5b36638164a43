"""SFT conversations as TFDS ArrayRecord datasets: upstream's conversation JSONL with its images inside.

    from qzoom_jax.data import tfds_sft
    tfds_sft.build_conversations("sft.jsonl", "/data/images", "/data/tfds", "my_sft")   # -> the dataset directory
    python -m qzoom_jax.train --config=configs/sft.py --config.data.tfds_dirs="('/data/tfds/conversations/my_sft/1.0.0',)"

A record holds ``uid``, ``conversations`` (the turns as JSON text) and ``images`` (the encoded files as they are;
a missing or unreadable file is stored empty, so the training run skips and counts that record as it would from
the JSONL). :class:`ConversationSource` reads them back as the records ``conversations.read_conversations`` gives,
with image bytes where the JSONL reader gives paths; ``conversations.make_example`` takes either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from qzoom_jax.data import conversations, stage1, tfds_datasets


class Conversations(tfds_datasets.RecordsBuilder, skip_registration=True):
    """SFT records: one conversation and its images."""

    def _features(self):
        return {
            "uid": tfds.features.Text(),
            "conversations": tfds.features.Text(),  # JSON: [{"from": ..., "value": ...}, ...]
            "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        }


def _records(jsonl: str, image_root: str | None):
    for record in conversations.read_conversations(jsonl, image_root):
        yield {"uid": record["uid"], "conversations": json.dumps(record["conversations"]),
               "images": [stage1.read_image_file(p) or b"" for p in record["images"]]}


def build_conversations(jsonl: str | os.PathLike, image_root: str | os.PathLike | None, data_dir: str | os.PathLike,
                        name: str) -> str:
    """The dataset ``name`` of a conversation JSONL (images resolved against ``image_root``, default the file's
    directory) under ``<data_dir>/conversations/``; reused while the JSONL and ``image_root`` are the same."""
    jsonl = os.fspath(jsonl)
    root = None if image_root is None else os.fspath(image_root)
    return tfds_datasets.prepare(Conversations, _records(jsonl, root), name=name,
                                 description=f"conversations {jsonl}", data_dir=data_dir,
                                 key=tfds_datasets.source_key([jsonl], image_root=root and os.path.abspath(root)))


class ConversationSource:
    """Random access to SFT records of prepared datasets (``conversations.read_conversations``' form)."""

    def __init__(self, dirs: Sequence[str | os.PathLike]):
        self._source = tfds_datasets.open_source(list(dirs))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        item = self._source[index]
        return {"uid": item["uid"], "conversations": json.loads(item["conversations"]),
                "images": [bytes(b) for b in item["images"]]}

