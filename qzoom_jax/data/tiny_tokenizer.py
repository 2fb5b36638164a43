"""A tiny, deterministic Qwen2-style tokenizer for tests and the tiny model (no downloads).

``write_tiny_tokenizer(out_dir)`` trains a byte-level BPE (``TINY_BASE_VOCAB`` entries) on an English corpus
generated here with a fixed seed, then appends Qwen2.5-VL's 22 added tokens in Qwen's order, so the layout
is that of the real tokenizer with ``151643`` replaced by ``TINY_BASE_VOCAB``. The pipeline (NFC, Qwen2 split
regex, byte-level) is the one transformers' ``Qwen2Tokenizer`` rebuilds, so HF and ``tokenizers`` agree.
It also writes tokenizer_config.json, chat_template.json and preprocessor_config.json, enough for
``transformers.AutoProcessor.from_pretrained(out_dir)`` to work offline. Re-running writes identical bytes.

``backbone="qwen3_vl"`` writes Qwen3-VL's files instead: the same BPE with Qwen3's 26 added tokens (four more:
tool responses and thinking), Qwen3-VL's chat template, and its image settings (16-px patches, so 32-px merged
units; mean/std 0.5; the pixel budget as ``size`` {shortest_edge, longest_edge}).
"""

from __future__ import annotations

import json
import os
import random

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from qzoom_jax.data.chat_template import TEMPLATES_DIR
from qzoom_jax.data.image_processing import CLIP_MEAN, CLIP_STD

TINY_BASE_VOCAB = 1000

# Qwen2's pre-tokenizer split (letters, single digits, punctuation runs, newlines, whitespace).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's added tokens in id order; the first 14 are "special" (skipped by skip_special_tokens),
# the tool/FIM ones are not, matching the official tokenizer_config.json.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
QWEN_NONSPECIAL_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
ADDED_TOKENS = QWEN_SPECIAL_TOKENS + QWEN_NONSPECIAL_ADDED_TOKENS
# Qwen3's tokenizer appends these (ids 151665-151668, not special).
QWEN3_EXTRA_ADDED_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
BACKBONES = ("qwen2_5_vl", "qwen3_vl")

# Small pixel budget so the tiny model sees few vision tokens: 4..256 merged tokens per image.
TINY_MIN_TOKENS, TINY_MAX_TOKENS = 4, 256
TINY_MIN_PIXELS = TINY_MIN_TOKENS * 28 * 28
TINY_MAX_PIXELS = TINY_MAX_TOKENS * 28 * 28

_WORDS = """
the a an of to in is are was were be been has have had do does did not what which who where when why how many much
color colour image picture photo shows show shown there this that these those on at with and or but for from by it its
you your we our they their he she his her helpful assistant system user answer question using single word phrase
describe left right top bottom middle center front back above below near next behind between inside outside
red green blue yellow black white orange purple pink brown gray grey cat dog car bus truck bike person people man
woman child table chair sky tree house road sign street building window door number text letter small large big
little tall short long wide one two three four five six seven eight nine ten yes no maybe about around after before
during first last other some any all each every more most less few time year day night morning water food bird
horse cow sheep boat train plane phone book clock bottle cup bowl look see find count read write name call make take
give keep hold open close turn move stand sit walk run play good new old great high low same different important
public able early young late hard real best better sure city world country state school family group company program
government part place case point hand eye face head body room area line side kind home story fact month lot study
work week please zoom region crop detail visible object located contains holding wearing standing sitting
""".split()


def _corpus(num_lines: int = 3000, seed: int = 0) -> list[str]:
    """Random sentences over ``_WORDS`` with punctuation and numbers; ``random.Random`` is stable across runs."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        lines.append(f"{sentence.capitalize()}{rng.choice('.?!,')} {rng.randint(0, 2025)}")
    return lines


def added_tokens(backbone: str = "qwen2_5_vl") -> tuple[str, ...]:
    """The backbone's added tokens in id order (ids from ``TINY_BASE_VOCAB`` on)."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    return ADDED_TOKENS + (QWEN3_EXTRA_ADDED_TOKENS if backbone == "qwen3_vl" else ())


def build_tiny_tokenizer(backbone: str = "qwen2_5_vl") -> Tokenizer:
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BASE_VOCAB,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
    )
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() != TINY_BASE_VOCAB:
        raise RuntimeError(f"tiny BPE has {tok.get_vocab_size()} entries, expected {TINY_BASE_VOCAB}")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN_SPECIAL_TOKENS])
    nonspecial = added_tokens(backbone)[len(QWEN_SPECIAL_TOKENS):]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in nonspecial])
    return tok


def tiny_special_token_ids(backbone: str = "qwen2_5_vl") -> dict[str, int]:
    """Token ids a tiny model config needs (same names as in a Qwen2.5-VL config.json), plus ``vocab_size``."""
    tokens = added_tokens(backbone)
    ids = {t: TINY_BASE_VOCAB + i for i, t in enumerate(tokens)}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids["<|endoftext|>"],  # Qwen has no BOS token; config.json still names <|endoftext|>
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vocab_size": TINY_BASE_VOCAB + len(tokens),
    }


def chat_template_source(backbone: str = "qwen2_5_vl") -> str:
    """The official chat template of the backbone's Instruct checkpoints, as shipped in ``TEMPLATES_DIR``."""
    added_tokens(backbone)  # checks the name
    with open(os.path.join(TEMPLATES_DIR, f"{backbone}.jinja"), encoding="utf-8", newline="") as f:
        return f.read()


def _tokenizer_config(padding_side: str, backbone: str) -> dict:
    added = {
        str(TINY_BASE_VOCAB + i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in QWEN_SPECIAL_TOKENS,
        }
        for i, t in enumerate(added_tokens(backbone))
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": chat_template_source(backbone),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144 if backbone == "qwen3_vl" else 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": padding_side,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _preprocessor_config(backbone: str) -> dict:
    if backbone == "qwen3_vl":
        factor = 32  # 16-px patches, merged 2 x 2
        return {
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "Qwen2VLImageProcessorFast",
            "image_std": [0.5, 0.5, 0.5],
            "merge_size": 2,
            "patch_size": 16,
            "processor_class": "Qwen3VLProcessor",
            "size": {"longest_edge": TINY_MAX_TOKENS * factor**2, "shortest_edge": TINY_MIN_TOKENS * factor**2},
            "temporal_patch_size": 2,
        }
    return {
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": list(CLIP_STD),
        "max_pixels": TINY_MAX_PIXELS,
        "merge_size": 2,
        "min_pixels": TINY_MIN_PIXELS,
        "patch_size": 14,
        "processor_class": "Qwen2_5_VLProcessor",
        "temporal_patch_size": 2,
    }


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")


def write_tiny_tokenizer(
    out_dir: str | os.PathLike, padding_side: str = "left", backbone: str = "qwen2_5_vl"
) -> str:
    """Write tokenizer.json, tokenizer_config.json, chat_template.json and preprocessor_config.json of
    ``backbone`` ("qwen2_5_vl" or "qwen3_vl").

    ``padding_side`` defaults to "left" because the tiny model is used for batched generation.
    Returns ``out_dir`` as a string.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    build_tiny_tokenizer(backbone).save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), _tokenizer_config(padding_side, backbone))
    _write_json(os.path.join(out_dir, "chat_template.json"), {"chat_template": chat_template_source(backbone)})
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), _preprocessor_config(backbone))
    return out_dir
