"""Packing (data/packing.py): a packed row gives every sample the loss and gradient it has alone in a row, and the
bucketed loader batches packs under both budgets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qzoom_jax.checkpoints.embedded import EMBEDDED_TINY
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.data import conversations, packing, pipeline, reading
from qzoom_jax.data.conversations import IGNORE
from qzoom_jax.data.processor import Processor
from qzoom_jax.training import sft, step

PIXELS = dict(min_pixels=4 * 784, max_pixels=16 * 784)
TRAINABLE = ("model/layers/", "lm_head/", "visual/merger/")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    records = conversations.read_conversations(reading.write_sft(str(tmp_path_factory.mktemp("pack")), 0, 6))
    model = load_pretrained(EMBEDDED_TINY)
    return records, model, Processor.from_pretrained(EMBEDDED_TINY)


def _packer(processor, config, max_len, max_patches, max_images):
    import functools
    sizes = functools.partial(conversations.sample_size, processor=processor, max_len=max_len,
                              max_patches=max_patches, max_images=1, **PIXELS)
    return packing.Packing(sizes, max_len, max_patches, max_images)


def test_packed_row_gives_each_sample_its_own_loss_and_gradient(setup):
    records, model, processor = setup
    config = model.config
    three = records[:3]
    packer = _packer(processor, config, 192, 192, 3)
    packs, keys = packer.group(three, [packer(r) for r in three])
    assert len(packs) == 1 and len(packs[0]["records"]) == 3
    row = packing.make_packed_example(packs[0], keys[0], processor=processor, config=config, max_images=3,
                                      **PIXELS)
    assert set(np.unique(row["segment_ids"])) == {0, 1, 2, 3}
    starts = np.flatnonzero(np.diff(row["segment_ids"], prepend=0) > 0)
    assert (row["positions"][:, starts] == 0).all()  # positions restart with every sample
    # Both batches get the same shapes (one compilation): the packed row plus two unsupervised copies, and the
    # three samples alone in rows as long as the packed one.
    alone = [conversations.make_example(r, processor, config, max_len=keys[0][0], n_patches=keys[0][1],
                                        max_images=3, **PIXELS) for r in three]
    unpacked = {k: np.stack([a[k] for a in alone]) for k in alone[0]}
    packed = {k: np.stack([v] * 3) for k, v in row.items()}
    packed["labels"][1:] = IGNORE
    unpacked["segment_ids"] = unpacked["attention_mask"]

    trainable, frozen = sft.split(model.params, sft.trainable_mask(model.params, TRAINABLE))
    loss = lambda t, b: sft.loss_fn(t, frozen, config, b, None, attn_impl="xla", compute_dtype="float32",
                                    chunk=64)[0]
    grad = jax.jit(jax.value_and_grad(loss))
    # Per sample: the packed row with only that sample's labels vs the batch of rows with only its row's.
    for i in range(3):
        only = {**packed, "labels": np.where((packed["segment_ids"] == i + 1) & (np.arange(3)[:, None] == 0),
                                             packed["labels"], IGNORE)}
        one = {**unpacked, "labels": np.where(np.arange(3)[:, None] == i, unpacked["labels"], IGNORE)}
        np.testing.assert_allclose(grad(trainable, only)[0], grad(trainable, one)[0], rtol=1e-5)
    # The whole row: loss and gradient equal those of the three samples as a batch of rows.
    (lp, gp), (lu, gu) = grad(trainable, packed), grad(trainable, unpacked)
    np.testing.assert_allclose(lp, lu, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gu)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.abs(b).max()))


def test_loader_batches_packs_under_both_budgets(setup):
    records, model, processor = setup
    config = model.config
    # Token budget 100 (two samples of ~45 tokens), patch budget 128 with two images (fillers count too).
    packer = _packer(processor, config, 100, 128, 2)
    example = lambda pack, shape: packing.make_packed_example(pack, shape, processor=processor, config=config,
                                                              max_images=2, **PIXELS)
    it, plan = pipeline.bucketed_loader(records, example, packer, global_batch_size=1, seed=0, num_epochs=1)
    rows = list(it)
    assert len(rows) == plan.per_epoch == 3  # six samples, two per row
    for b in rows:
        ids = b["segment_ids"][0]
        assert ids.max() == 2 and b["input_ids"].shape[1] <= 128 and b["pixel_values"].shape[1] <= 128
        assert (b["attention_mask"][0] == (ids > 0)).all()
        assert float(step._samples(b)) == 2  # the train step's samples metric counts the row's samples
