"""Speed, measured side by side in one run and reported as ratios: ``python -m qzoom_jax.bench``.

Benchmarks (``--only NAME`` to pick some):
  forward   one prefill forward (vision + decoder + lm_head): our jitted JAX vs transformers (PyTorch, eager)
  generate  greedy generation of ``--new-tokens`` tokens with a KV cache: JAX vs transformers

Both libraries get the same random weights and the same inputs; times are medians over ``--repeats`` after a
warm-up (JAX compile time is reported separately). The comparison needs ``transformers`` and ``torch``
(``pip install -e .[test]``). Example:

  python -m qzoom_jax.bench --size small --image 448 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

SIZES = {
    # A model large enough that the math, not Python overhead, dominates on CPU.
    "small": dict(text=dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=2, mrope_section=[8, 12, 12]),
                  vision=dict(depth=8, hidden_size=256, intermediate_size=512, num_heads=4,
                              fullatt_block_indexes=[3, 7])),
    "tiny": dict(text=dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2, mrope_section=[4, 6, 6]),
                 vision=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4,
                             fullatt_block_indexes=[1, 3])),
}
SPECIAL = dict(image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003,
               bos_token_id=1004, eos_token_id=1005, pad_token_id=1004)


def _models(size: str, seed: int):
    import torch
    import transformers
    from qzoom_jax.config import QwenVLConfig
    from qzoom_jax.hf_checkpoint import params_from_state_dict
    from qzoom_jax.models.vlm import QwenVL

    spec = SIZES[size]
    t = dict(spec["text"])
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": t.pop("mrope_section")}
    hf_cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(rope_parameters=rope, **t, **{k: SPECIAL[k] for k in ("bos_token_id", "eos_token_id",
                                                                                  "pad_token_id")}),
        vision_config=dict(out_hidden_size=t["hidden_size"], window_size=112, **spec["vision"]), **SPECIAL)
    torch.manual_seed(seed)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    hf.set_attn_implementation("eager")
    config = QwenVLConfig.from_dict(hf.config.to_dict())
    return hf, QwenVL(config, params_from_state_dict(hf.state_dict(), config))


def _inputs(config, image: int, text: int, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    g = image // config.vision.patch_size
    n_img = g * g // config.vision.merge_unit
    row = ([int(x) for x in rng.integers(0, 900, 8)] + [config.vision_start_token_id]
           + [config.image_token_id] * n_img + [config.vision_end_token_id]
           + [int(x) for x in rng.integers(0, 900, text)])
    ids = np.array([row] * batch, np.int64)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids),
                mm_token_type_ids=(ids == config.image_token_id).astype(np.int64),
                pixel_values=rng.standard_normal((batch * g * g, config.vision.patch_dim)).astype(np.float32),
                image_grid_thw=np.array([[1, g, g]] * batch, np.int64))


def _time(fn, repeats: int):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def bench_forward(hf, ours, inputs, args):
    import torch
    torch_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
    jax_first, jax_t = _time(lambda: ours.logits(**inputs), args.repeats)
    with torch.no_grad():
        _, torch_t = _time(lambda: hf(**torch_inputs).logits.numpy(), args.repeats)
    return dict(jax_s=jax_t, jax_compile_s=jax_first - jax_t, torch_s=torch_t, speedup=torch_t / jax_t)


def bench_generate(hf, ours, inputs, args):
    import torch
    torch_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
    n = args.new_tokens
    eos = -1  # never stop early, so both produce exactly n tokens
    ours_noeos = type(ours)(dataclasses.replace(ours.config, eos_token_id=eos), ours.params)
    jax_first, jax_t = _time(lambda: ours_noeos.generate(**inputs, max_new_tokens=n), args.repeats)
    with torch.no_grad():
        _, torch_t = _time(lambda: hf.generate(**torch_inputs, max_new_tokens=n, min_new_tokens=n,
                                               do_sample=False, pad_token_id=SPECIAL["pad_token_id"]),
                           args.repeats)
    return dict(new_tokens=n, jax_s=jax_t, jax_compile_s=jax_first - jax_t, torch_s=torch_t,
                speedup=torch_t / jax_t)


BENCHES = {"forward": bench_forward, "generate": bench_generate}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=sorted(BENCHES))
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--image", type=int, default=448, help="square image side in px (multiple of 28)")
    p.add_argument("--text", type=int, default=32, help="text tokens after the image")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args(argv)

    import jax
    hf, ours = _models(args.size, args.seed)
    inputs = _inputs(ours.config, args.image, args.text, args.batch, args.seed)
    header = dict(size=args.size, image=args.image, batch=args.batch, seq_len=int(inputs["input_ids"].shape[1]),
                  jax_backend=jax.default_backend(), dtype="float32")
    print(f"{'bench':10s} {'jax (s)':>10s} {'torch (s)':>10s} {'torch/jax':>10s} {'jax compile (s)':>16s}")
    for name in args.only:
        row = {"bench": name, **header, **BENCHES[name](hf, ours, inputs, args)}
        print(f"{name:10s} {row['jax_s']:10.4f} {row['torch_s']:10.4f} {row['speedup']:10.2f}x "
              f"{row['jax_compile_s']:16.2f}")
        line = json.dumps(row)
        print(line)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
