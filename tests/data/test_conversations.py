"""Conversation JSONL -> SFT examples: upstream's template and label masking (§5.2), skips with reasons."""

import json

import numpy as np

import pytest
from PIL import Image

from qzoom_jax.checkpoints.embedded import EMBEDDED_TINY
from qzoom_jax.data import conversations as cv
from qzoom_jax.data import pipeline, reading
from qzoom_jax.data.processor import Processor
from qzoom_jax.data.stage1 import SkipSample
from qzoom_jax.data.tokenizer import ChatText
from qzoom_jax.models import registry
from qzoom_jax.runtime.buckets import bucket
from qzoom_jax.runtime.errors import DataError

SHAPES = dict(max_len=128, n_patches=256, max_images=2, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)


@pytest.fixture(scope="module")
def proc():
    return Processor.from_pretrained(EMBEDDED_TINY)


@pytest.fixture(scope="module")
def config():
    return registry.read_config(EMBEDDED_TINY)


def _record(turns, images=()):
    return {"uid": "r", "images": list(images), "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_two_turn_labels_are_exactly_the_assistant_tokens(proc, config, tmp_path):
    Image.new("RGB", (56, 84), (200, 10, 10)).save(tmp_path / "a.png")
    rec = _record([("human", "<image>\nWhat <|im_end|> colour?"), ("gpt", "Red."),
                   ("human", "Sure?"), ("gpt", "Yes")], [str(tmp_path / "a.png")])
    ex = cv.make_example(rec, proc, config, **SHAPES)
    tok = proc.tokenizer
    enc = lambda *segs: tok.encode(ChatText(segs))
    # Upstream's text (no system turn, literal "<image>" before the image block); message text stays text.
    user = lambda body: enc(("<|im_start|>", True), ("user\n", False), *body, ("<|im_end|>", True), ("\n", False))
    asst = enc(("<|im_start|>", True), ("assistant\n", False))
    ans = lambda a: enc((a, False), ("<|im_end|>", True), ("\n", False))
    n_img = 2 * 3  # 56 x 84 px -> 4 x 6 patches -> 2 x 3 merged tokens
    first = user([("<image>", False), ("<|vision_start|>", True)] + [("<|image_pad|>", True)] * n_img
                 + [("<|vision_end|>", True), ("\nWhat <|im_end|> colour?", False)])
    ids = first + asst + ans("Red.") + user([("Sure?", False)]) + asst + ans("Yes")
    labels = ([-100] * (len(first) + len(asst)) + ans("Red.") + [-100] * (len(user([("Sure?", False)])) + len(asst))
              + ans("Yes"))
    n = len(ids)
    assert ex["attention_mask"].tolist() == [1] * n + [0] * (128 - n)
    assert ex["input_ids"][:n].tolist() == ids
    assert ex["labels"].tolist() == labels + [-100] * (128 - n)
    assert tok.decode(ex["labels"][ex["labels"] != -100]) == "Red.<|im_end|>\nYes<|im_end|>\n"
    assert (ex["input_ids"] == config.image_token_id).sum() == n_img
    assert tok.im_end_id not in ids[:len(first) - 2]  # the "<|im_end|>" in the question is characters
    # Per-turn encoding equals encoding the whole text at once.
    whole = proc.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False)
    assert whole.startswith("<|im_start|>system")


def test_aspect_ratio_kept_and_shapes_fixed(proc, config, tmp_path):
    Image.new("RGB", (300, 100), "white").save(tmp_path / "wide.png")
    Image.new("RGB", (80, 240), "white").save(tmp_path / "tall.png")
    rec = _record([("human", "<image> and <image>"), ("gpt", "two")], [str(tmp_path / "wide.png"),
                                                                      str(tmp_path / "tall.png")])
    ex = cv.make_example(rec, proc, config, **SHAPES)
    one = cv.make_example(_record([("human", "<image>"), ("gpt", "one")], [str(tmp_path / "wide.png")]), proc,
                          config, **SHAPES)
    assert {k: v.shape for k, v in ex.items()} == {k: v.shape for k, v in one.items()}
    grid_tokens = (ex["input_ids"] == config.image_token_id).sum()
    assert grid_tokens > (one["input_ids"] == config.image_token_id).sum()


@pytest.mark.parametrize("turns,n_images,reason", [
    ([("human", "Hi"), ("gpt", "Yo")], 1, "1 image(s) but 0 <image> placeholder(s)"),
    ([("human", "<image><image>"), ("gpt", "Yo")], 1, "2 <image> placeholders but 1 image(s)"),
    ([("human", "<image>"), ("gpt", "  ")], 1, "empty answer"),
    ([("human", "<image>"), ("human", "again"), ("gpt", "x"), ("gpt", "y")], 1, "are not human/gpt pairs"),
    ([("human", "<image>")], 1, "are not human/gpt pairs"),
    ([("human", "<image>" + " word" * 200), ("gpt", "x")], 1, "longer than max_len=128"),
])
def test_bad_records_are_skipped_with_a_reason(proc, config, tmp_path, turns, n_images, reason):
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    with pytest.raises(SkipSample, match="^r: .*" + reason.replace("(", r"\(").replace(")", r"\)")):
        cv.make_example(_record(turns, [str(tmp_path / "a.png")] * n_images), proc, config, **SHAPES)


def test_missing_image_is_skipped_and_a_leading_gpt_turn_dropped(proc, config, tmp_path):
    with pytest.raises(SkipSample, match="missing or unreadable image"):
        cv.make_example(_record([("human", "<image>"), ("gpt", "x")], [str(tmp_path / "nope.png")]), proc, config,
                        **SHAPES)
    ex = cv.make_example(_record([("gpt", "hello"), ("human", "q"), ("gpt", "a")]), proc, config, **SHAPES)
    assert proc.tokenizer.decode(ex["labels"][ex["labels"] != -100]) == "a<|im_end|>\n"


def test_reader_and_loader_count_skips(proc, config, tmp_path):
    path = reading.write_sft(str(tmp_path), 0, 4)
    with open(path, "a") as f:
        f.write(json.dumps({"id": "bad", "image": "reading_sft_single/000000_0.png",
                            "conversations": [{"from": "human", "value": "no placeholder"},
                                              {"from": "gpt", "value": "x"}]}) + "\n")
    records = cv.read_conversations(path)
    assert len(records) == 5 and records[0]["images"][0].startswith(str(tmp_path))
    fn = lambda r: cv.make_example(r, proc, config, **SHAPES)
    it = iter(pipeline.training_loader(records, fn, global_batch_size=2, seed=0, shuffle=False))
    batches = [next(it), next(it), next(it)]  # the third crosses the bad record at the end
    assert batches[0]["input_ids"].shape == (2, 128) and it.skipped == 1
    (tmp_path / "broken.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(DataError, match="broken.jsonl:1: 'conversations' must be a list"):
        cv.read_conversations(tmp_path / "broken.jsonl")


def test_inference_format_is_the_engines_prompt_then_the_answer(proc, config, tmp_path):
    """chat_format="inference": the prompt ids equal the Q-Zoom engine's (system turn, both images, question),
    so a model fine-tuned so is served the text it learnt on; only the answer is supervised."""
    for name, size in (("a.png", (56, 84)), ("b.png", (84, 56))):
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / name)
    question = "What number is written in the red box?"
    rec = _record([("human", "<image><image>\n" + question), ("gpt", "417")],
                  [str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    ex = cv.make_example(rec, proc, config, **SHAPES, chat_format="inference")
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")]
    engine = proc(images=images, text=[prompt], min_pixels=SHAPES["min_pixels"], max_pixels=SHAPES["max_pixels"])
    prompt_ids = [int(i) for i in engine["input_ids"][0]]
    answer = proc.tokenizer.encode(ChatText([("417", False), ("<|im_end|>", True), ("\n", False)]))
    n = len(prompt_ids) + len(answer)
    assert ex["input_ids"][:n].tolist() == prompt_ids + answer
    assert ex["labels"][:n].tolist() == [-100] * len(prompt_ids) + answer
    assert prompt.startswith("<|im_start|>system")
    with pytest.raises(ValueError, match="chat_format must be one of"):
        cv.make_example(rec, proc, config, **SHAPES, chat_format="chatml")


def test_bucket_of_is_the_tight_bucket_of_the_example_it_predicts(proc, config, tmp_path):
    """From the text and the image headers alone: the bucket that the example's real tokens and patch rows round
    up to; an EXIF-rotated image counts with its sides swapped, as it is decoded."""
    Image.new("RGB", (56, 140), (10, 200, 10)).save(tmp_path / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: decoded as 140 x 56
    Image.new("RGB", (56, 140), (10, 10, 200)).save(tmp_path / "r.jpg", exif=exif)
    limits = dict(max_len=512, max_images=2, min_pixels=4 * 784, max_pixels=16 * 784)
    for images, turns in ((["a.png"], [("human", "<image>\nHow many?"), ("gpt", "4")]),
                          (["a.png", "r.jpg"], [("human", "<image><image>\nSame?"), ("gpt", "No"),
                                                ("human", "Sure?"), ("gpt", "Yes, the second is rotated.")])):
        rec = _record(turns, [str(tmp_path / p) for p in images])
        for chat_format in ("upstream", "inference"):
            tokens, patches = cv.bucket_of(rec, proc, max_patches=1024, chat_format=chat_format, **limits)
            ex = cv.make_example(rec, proc, config, n_patches=patches, chat_format=chat_format,
                                 **{**limits, "max_len": tokens})
            used = int(ex["attention_mask"].sum())
            rows = int(ex["layout_merged_valid"].sum()) * 4  # the images' and the fillers' merged tokens
            assert bucket(used) == tokens and bucket(rows, 64) == patches, (images, chat_format)
    with pytest.raises(SkipSample, match="longer than max_len=8"):
        cv.bucket_of(rec, proc, max_patches=1024, **{**limits, "max_len": 8})
    with pytest.raises(SkipSample, match="more than max_patches=16"):
        cv.bucket_of(rec, proc, max_patches=16, **limits)
    with pytest.raises(SkipSample, match="missing or unreadable image"):
        cv.bucket_of(_record(turns, [str(tmp_path / "nope.png")] * 2), proc, max_patches=1024, **limits)


def test_tfds_conversations_give_the_jsonl_examples(proc, config, tmp_path):
    from qzoom_jax.data import tfds_sft

    path = reading.write_sft(str(tmp_path), 0, 3)
    with open(path, "a") as f:  # a record whose image is gone: stored empty, skipped at training time
        f.write(json.dumps({"id": "gone", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}) + "\n")
    out = tfds_sft.build_conversations(path, None, str(tmp_path / "tfds"), "reading")
    assert out.startswith(str(tmp_path / "tfds")) and tfds_sft.build_conversations(path, None, str(tmp_path / "tfds"),
                                                                                 "reading") == out  # a cache
    source, jsonl = tfds_sft.ConversationSource([out]), cv.read_conversations(path)
    assert len(source) == 4
    limits = dict(max_images=2, min_pixels=4 * 784, max_pixels=16 * 784, chat_format="inference")
    for i in range(3):
        stored, read = source[i], jsonl[i]
        assert stored["uid"] == read["uid"] and stored["conversations"] == read["conversations"]
        assert stored["images"][0] == open(read["images"][0], "rb").read()
        key = cv.bucket_of(read, proc, max_len=512, max_patches=512, **limits)
        assert cv.bucket_of(stored, proc, max_len=512, max_patches=512, **limits) == key
        a, b = (cv.make_example(r, proc, config, max_len=key[0], n_patches=key[1], **limits) for r in (stored, read))
        assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(SkipSample, match="gone: missing or unreadable image stored image"):
        cv.make_example(source[3], proc, config, max_len=128, n_patches=256, **limits)
