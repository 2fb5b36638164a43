"""Speed, measured side by side in one run and reported as ratios: ``python -m qzoom_jax.bench``.

Benchmarks (``--only NAME`` to pick some):
  forward   one prefill forward (vision + decoder + lm_head): our jitted JAX vs transformers (PyTorch, sdpa attention)
  generate  greedy generation of ``--new-tokens`` tokens with a KV cache: JAX vs transformers
  vision    the vision tower alone on the ``--batch`` images: JAX (forward, generate, vision: ``--attn-impl``) vs HF
  train     one stage-1 (SD-RPN) train step at the fixed ``--grid`` (24 = 576 image tokens): samples/s and MFU
            of our jitted step (JAX only: the upstream trainer is a DeepSpeed/GPU program), backbone in
            ``--dtype``; ``--size qwen2_5vl_7b`` / ``qwen3vl_4b`` build 7B / 4B-shaped random-weight models (K=18 /
            24, T=3; forward, generate and qzoom run on them too, against transformers' Qwen3-VL for the 4B)
  sft_memory  per-device memory of one full-model SFT step at Qwen2.5-VL-7B shapes (whole LLM trainable, vision
            frozen, fp32 master weights + AdamW, bf16 compute, full remat, ``--sft-tokens`` tokens per device,
            ``--fsdp``-way FSDP): an ahead-of-time compile on abstract inputs (nothing allocated) and XLA's
            memory analysis; on CPU run with XLA_FLAGS=--xla_force_host_platform_device_count=8
  post_sft  stage-2 steps (RoI pass with the current weights -> host crop + splice -> train step) with the
            time of each part; ``--size qwen2_5vl_7b``: ahead-of-time compiles of the 7B RoI pass and train step
            on abstract inputs over ``--fsdp`` devices (per-device memory; XLA_FLAGS host devices on CPU)
  qzoom     per-sample latency (batch 1): baseline generation at ``--large`` visual tokens vs Q-Zoom at ``--small``
            with the gate forced off and on, and the baseline in JAX vs transformers ``generate`` at both budgets

Both libraries get the same random weights and the same inputs; times are medians over ``--repeats`` after a
warm-up (JAX compile time is reported separately). The comparison needs ``transformers`` and ``torch``
(``pip install -e .[test]``). Example:

  python -m qzoom_jax.bench --size small --image 448 --repeats 5
  python -m qzoom_jax.bench --only qzoom --size small --large 1024 --small 256
  python -m qzoom_jax.bench --only train --size qwen2_5vl_7b --dtype bfloat16 --batch 8   # on a GPU/TPU
  python -m qzoom_jax.bench --only post_sft --size tiny --batch 4
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m qzoom_jax.bench --only post_sft \
      --size qwen2_5vl_7b --dtype bfloat16 --post-sft-tokens 576
  python -m qzoom_jax.bench --only qzoom --size qwen2_5vl_7b --dtype bfloat16 --large 4096 --small 576 \
      --attn-impl cudnn                                                                  # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import jax
import numpy as np

from qzoom_jax.models import param_axes
from qzoom_jax.runtime import cli, torch_env
from qzoom_jax.training import optim as optim_lib
from qzoom_jax.training import step as step_lib
from qzoom_jax.data.tiny_tokenizer import tiny_special_token_ids

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
# Shapes only (random weights): the stage-1 train-step benchmark at the real size. Not compared with transformers.
QWEN2_5VL_7B = dict(text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4, mrope_section=[16, 24, 24]),
                    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                fullatt_block_indexes=[7, 15, 23, 31]))
QWEN3VL_4B = dict(text=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20]),
                  vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                              num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]))
TWIG = {"tiny": (3, 3), "small": (4, 2), "qwen2_5vl_7b": (18, 3), "qwen3vl_4b": (24, 3)}  # (K, T) of the benches
# The embedded tokenizer's special-token ids, so its processor can feed every benchmark model.
SPECIAL = {k: v for k, v in tiny_special_token_ids().items() if k != "vocab_size"}


def _hf_config(size: str):
    torch_env.make_torchvision_importable()
    import transformers

    spec = {**SIZES, "qwen2_5vl_7b": QWEN2_5VL_7B, "qwen3vl_4b": QWEN3VL_4B}[size]
    t = dict(spec["text"])
    if size == "qwen3vl_4b":  # tied embeddings, interleaved M-RoPE (Qwen3-VL-4B-Instruct's config)
        rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": t.pop("mrope_section"),
                "mrope_interleaved": True}
        ids = {k: SPECIAL[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return transformers.Qwen3VLConfig(text_config=dict(rope_parameters=rope, tie_word_embeddings=True, **t, **ids),
                                          vision_config=dict(out_hidden_size=t["hidden_size"], **spec["vision"]),
                                          tie_word_embeddings=True, **SPECIAL)
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": t.pop("mrope_section")}
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(rope_parameters=rope, **t, **{k: SPECIAL[k] for k in ("bos_token_id", "eos_token_id",
                                                                                  "pad_token_id")}),
        vision_config=dict(out_hidden_size=t["hidden_size"], window_size=112, **spec["vision"]), **SPECIAL)


def _models(size: str, seed: int, dtype: str = "float32", attn_impl: str = "einsum"):
    """The same random weights in transformers (sdpa attention, its default; on CUDA when torch has it) and in
    JAX."""
    torch_env.make_torchvision_importable()
    import torch
    import transformers

    from qzoom_jax.checkpoints.hf_checkpoint import params_from_state_dict
    from qzoom_jax.models import registry
    from qzoom_jax.models.vlm import QwenVL, as_dtype

    torch.manual_seed(seed)
    model_class = (transformers.Qwen3VLForConditionalGeneration if size == "qwen3vl_4b"
                   else transformers.Qwen2_5_VLForConditionalGeneration)
    hf = model_class(_hf_config(size)).eval()
    hf.set_attn_implementation("sdpa")
    config = registry.config_from_dict(hf.config.to_dict())
    ours = QwenVL(config, params_from_state_dict(hf.state_dict(), config, as_dtype(dtype)), attn_impl)
    hf = hf.to(getattr(torch, dtype)).to("cuda" if torch.cuda.is_available() else "cpu")
    return hf, ours


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


def _to_torch(inputs: dict, hf) -> dict:
    import torch

    dtype = next(hf.parameters()).dtype
    return {k: torch.from_numpy(np.asarray(v)).to(hf.device, dtype=dtype if k == "pixel_values" else None)
            for k, v in inputs.items()}


def _side_by_side(jax_fn, torch_fn, args, **extra):
    """Median times of ``jax_fn`` (its first call, less a median, is the compile time) and ``torch_fn``."""
    import torch
    jax_first, jax_t = _time(jax_fn, args.repeats)
    with torch.no_grad():
        _, torch_t = _time(torch_fn, args.repeats)
    return dict(extra, jax_s=jax_t, jax_compile_s=jax_first - jax_t, torch_s=torch_t, speedup=torch_t / jax_t)


def bench_forward(hf, ours, inputs, args):
    torch_inputs = _to_torch(inputs, hf)
    return _side_by_side(lambda: ours.logits(**inputs), lambda: hf(**torch_inputs).logits.numpy(), args)


def bench_generate(hf, ours, inputs, args):
    torch_inputs, n = _to_torch(inputs, hf), args.new_tokens
    # eos -1: never stop early, so both produce exactly n tokens
    ours_noeos = type(ours)(dataclasses.replace(ours.config, eos_token_id=-1), ours.params, ours.attn_impl)
    return _side_by_side(lambda: ours_noeos.generate(**inputs, max_new_tokens=n),
                         lambda: hf.generate(**torch_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                             pad_token_id=SPECIAL["pad_token_id"]), args, new_tokens=n)


def bench_vision(hf, ours, inputs, args):
    from qzoom_jax.models import registry, vlm

    config, pv, t = ours.config, np.asarray(inputs["pixel_values"]), _to_torch(inputs, hf)
    layout = registry.backbone(config).vision_layout(inputs["image_grid_thw"], config.vision)
    encode = jax.jit(lambda p, pv, lay: vlm.encode(p, config, pv, lay, attn_impl=ours.attn_impl)[0])
    return _side_by_side(lambda: jax.block_until_ready(encode(ours.params, pv, layout)),
                         lambda: hf.model.visual(t["pixel_values"], t["image_grid_thw"]), args, patches=len(pv))


def bench_train(args):
    """Stage-1 train steps on random weights and labels, through ``qzoom_jax.train``'s own step and shardings."""
    import jax.numpy as jnp
    import ml_collections

    from qzoom_jax.training import metrics
    from qzoom_jax.runtime import parallel
    from qzoom_jax.models import registry
    from qzoom_jax.models.vlm import as_dtype, init_params

    config = registry.config_from_dict(_hf_config(args.size).to_dict())
    bb = registry.backbone(config)
    K, T = TWIG[args.size]
    mesh = parallel.make_mesh()
    dtype = as_dtype(args.dtype)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(args.seed), dtype))
    backbone = jax.jit(lambda: init_params(config, jax.random.key(args.seed), dtype),
                       out_shardings=param_axes.param_shardings(shapes, mesh))()
    optim = ml_collections.ConfigDict(dict(lr=1e-4, warmup_ratio=0.03, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                           clip_norm=1.0))
    tx = optim_lib.make_optimizer(optim, 1000)
    state = step_lib.init_state(backbone, K, T, tx, mesh)

    rng = np.random.default_rng(args.seed)
    n_img, side = args.grid * args.grid, 2 * args.grid
    row = ([config.vision_start_token_id] + [config.image_token_id] * n_img + [config.vision_end_token_id]
           + [int(x) for x in rng.integers(0, 900, args.text)])
    ids = np.array([row] * args.batch, np.int32)
    positions, _ = bb.positions(config, ids, np.ones_like(ids), np.array([[1, side, side]] * args.batch))
    batch = step_lib.global_batch(dict(
        input_ids=ids, attention_mask=np.ones_like(ids), positions=positions.transpose(1, 0, 2),
        pixel_values=rng.standard_normal((args.batch, side * side, config.vision.patch_dim)).astype(np.float32),
        labels=rng.choice(np.array([-100, 0, 1], np.int32), (args.batch, n_img))), mesh)
    layout = bb.vision_layout(np.array([[1, side, side]]), config.vision)
    t0 = time.perf_counter()
    compiled, flops = step_lib.compile_step(step_lib.make_train_step(config, tx, K, 0.5, args.attn_impl), state,
                                            backbone, batch, layout, mesh)
    compile_s = time.perf_counter() - t0

    def run():
        nonlocal state
        state, m = compiled(state, backbone, batch, layout)
        jnp.asarray(m["loss"]).block_until_ready()

    _, step_s = _time(run, args.repeats)
    mfu = metrics.mfu(flops, step_s, mesh.size, metrics.peak_flops_per_device(mesh.devices.flat[0]))
    return dict(K=K, T=T, grid=args.grid, step_s=step_s, samples_per_s=args.batch / step_s,
                tflops_per_step=flops / 1e12, mfu=mfu, devices=mesh.size,
                device=jax.devices()[0].device_kind, jax_compile_s=compile_s)


def bench_qzoom(args):
    """Per-sample latency at batch 1, wall clock around generation as the reference measures it (§6.4): the
    baseline at ``--large`` tokens vs Q-Zoom at ``--small`` tokens with the gate forced off (answer from pass 1)
    and forced on (RoI threshold 0: the crop is re-encoded at the same ``--small`` budget whatever its size, so
    its cost does not depend on the random twig's map); and our JAX baseline vs transformers ``generate`` at the
    same settings. Every run generates exactly ``--new-tokens`` tokens (eos disabled)."""
    import torch

    from qzoom_jax.checkpoints import qzoom_checkpoint
    from qzoom_jax.data import synthetic
    from qzoom_jax.data.processor import Processor
    from qzoom_jax.models.qzoom import gate, twig
    from qzoom_jax.checkpoints.embedded import EMBEDDED_DEFAULT, EMBEDDED_QWEN3_TINY
    from qzoom_jax.models.vlm import QwenVL
    from qzoom_jax.zoom.engine import QZoom

    hf, ours = _models(args.size, args.seed, args.dtype, args.attn_impl)
    n = args.new_tokens
    model = QwenVL(dataclasses.replace(ours.config, eos_token_id=-1), ours.params, ours.attn_impl)
    K, T = TWIG[args.size]
    layers = model.params["model"]["layers"]
    files = EMBEDDED_QWEN3_TINY if args.size == "qwen3vl_4b" else EMBEDDED_DEFAULT  # tokenizer + processor
    parts = qzoom_checkpoint.QZoomParts(model, files, twig.init_twig_params(layers, K, T),
                                        gate.init_gate_params(layers, K, T, jax.random.key(args.seed)), K, True)
    engine = QZoom(parts, Processor.from_pretrained(files))
    f = engine.processor.image_processor.factor
    sample = synthetic.make_sample(args.seed, 0)
    budget = lambda tokens: {"min_pixels": tokens * f * f, "max_pixels": tokens * f * f}
    large = engine.prepare([sample.image], [sample.prompt], **budget(args.large))
    small = engine.prepare([sample.image], [sample.prompt], **budget(args.small))
    run = lambda prepared, **kw: engine.run(prepared, max_new_tokens=n, roi_threshold=0.0, **kw)[0]
    variants = {
        "baseline_large": lambda: run(large, gate_threshold=0.0, zoom=False),
        "baseline_small": lambda: run(small, gate_threshold=0.0, zoom=False),
        "qzoom_small_gate_off": lambda: run(small, gate_threshold=2.0),
        "qzoom_small_gate_on": lambda: run(small, gate_threshold=0.0),
    }
    out = {"large_tokens": args.large, "small_tokens": args.small, "new_tokens": n}
    for name, fn in variants.items():
        first, t = _time(fn, args.repeats)
        answer = fn()
        assert answer.num_tokens == n, (name, answer.num_tokens)
        out[name] = {"latency_s": t, "jax_compile_s": first - t, "visual_tokens": answer.visual_tokens,
                     "zoomed": answer.zoomed}
    for name, prepared in (("torch_baseline_large", large), ("torch_baseline_small", small)):
        inputs = _to_torch(prepared.inputs, hf)
        with torch.no_grad():
            _, t = _time(functools.partial(hf.generate, **inputs, max_new_tokens=n, min_new_tokens=n,
                                           do_sample=False, pad_token_id=SPECIAL["pad_token_id"]), args.repeats)
        out[name] = {"latency_s": t}
    lat = {k: v["latency_s"] for k, v in out.items() if isinstance(v, dict)}
    out["speedup_vs_baseline_large"] = {k: lat["baseline_large"] / lat[k] for k in
                                        ("qzoom_small_gate_off", "qzoom_small_gate_on", "baseline_small")}
    out["torch_over_jax"] = {"large": lat["torch_baseline_large"] / lat["baseline_large"],
                             "small": lat["torch_baseline_small"] / lat["baseline_small"]}
    return out


def _qwen7b_config():
    """Qwen2.5-VL-7B's config (the official token ids and vision tower), without a checkpoint."""
    from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig

    t, v = QWEN2_5VL_7B["text"], QWEN2_5VL_7B["vision"]
    raw = {"model_type": "qwen2_5_vl", **{k: x for k, x in t.items() if k != "mrope_section"},
           "rope_scaling": {"type": "mrope", "mrope_section": t["mrope_section"]}, "rms_norm_eps": 1e-6,
           "rope_theta": 1e6, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
           "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
           "vision_end_token_id": 151653,
           "vision_config": {**v, "in_chans": 3, "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
                             "window_size": 112, "tokens_per_second": 2, "out_hidden_size": t["hidden_size"]}}
    return QwenVLConfig.from_dict(raw, source="qwen2_5vl_7b")


def bench_sft_memory(args):
    """Compiles ``qzoom_jax.train``'s own SFT step for 7B shapes on abstract, sharded inputs and reports XLA's
    per-device memory: arguments (state + frozen params + batch), outputs, temporaries."""
    import ml_collections

    from qzoom_jax.data import conversations
    from qzoom_jax.models import registry
    from qzoom_jax.models.vlm import init_params
    from qzoom_jax.runtime import parallel
    from qzoom_jax.training import sft

    if jax.device_count() < args.fsdp:
        raise SystemExit(f"sft_memory needs {args.fsdp} devices, found {jax.device_count()}: on CPU set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={args.fsdp}")
    config = _qwen7b_config()
    mesh = parallel.make_mesh(fsdp=args.fsdp, devices=jax.devices()[:args.fsdp])
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), jax.numpy.bfloat16))
    trainable, frozen = sft.split(shapes, sft.trainable_mask(shapes, ("model/", "lm_head/")))
    optim = ml_collections.ConfigDict(dict(lr=1e-5, warmup_ratio=0.03, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                           clip_norm=1.0))
    tx = optim_lib.make_optimizer(optim, 1000)
    sds = lambda tree, shardings, dtype=None: jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), tree, shardings)
    master = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), trainable)
    shard = step_lib.state_shardings(master, tx, mesh)
    state = {"params": sds(master, shard["params"]),
             "opt_state": sds(jax.eval_shape(tx.init, master), shard["opt_state"]),
             "step": jax.ShapeDtypeStruct((), np.int32, sharding=shard["step"])}
    frozen = sds(frozen, param_axes.param_shardings(frozen, mesh))

    # One row of --sft-tokens tokens per device, a quarter of them one image's merged tokens (4 patches each).
    L, B = args.sft_tokens, args.fsdp
    n_patches = L  # = 4 x (L / 4) merged image tokens
    grid = np.array([[1, 64, n_patches // 64]])  # 64 x 128 patches at 8k: a 896 x 1792 px image
    layout = registry.backbone(config).vision_layout(grid, config.vision, pad_to=n_patches,
                                                     **conversations.layout_minima(config.vision, n_patches, 1))
    row = {"input_ids": ((L,), np.int32), "attention_mask": ((L,), np.int32), "labels": ((L,), np.int32),
           "positions": ((3, L), np.float32), "pixel_values": ((n_patches, config.vision.patch_dim), np.float32),
           **{f"layout_{k}": (a.shape, a.dtype) for k, a in layout._asdict().items()}}
    sharding = step_lib.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((B, *shape), dtype, sharding=sharding) for k, (shape, dtype) in row.items()}
    loss = functools.partial(sft.loss_fn, compute_dtype="bfloat16", remat="full", chunk=1024,
                             activations=None if args.no_pin else sharding)
    train_step = step_lib.make_train_step(config, tx, None, None, args.attn_impl, loss, weight="supervised_tokens")
    t0 = time.perf_counter()
    compiled, flops = step_lib.compile_step(train_step, state, frozen, batch, None, mesh)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    gib = lambda n: n / 2 ** 30
    size = lambda tree: sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree))
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return dict(devices=args.fsdp, tokens_per_device=L, image_patches_per_device=n_patches,
                trainable_params=sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(trainable)),
                frozen_params=sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(frozen)),
                state_gib_global=gib(size(state)), argument_gib=gib(mem.argument_size_in_bytes),
                output_gib=gib(mem.output_size_in_bytes), alias_gib=gib(mem.alias_size_in_bytes),
                temp_gib=gib(mem.temp_size_in_bytes), per_device_gib=gib(total), tflops_per_step=flops / 1e12,
                jax_compile_s=compile_s, backend=jax.default_backend())


def _post_sft_records(n: int, seed: int) -> list[dict]:
    """``n`` one-image conversations of the synthetic scenes (the image as its encoded file)."""
    from qzoom_jax.data import synthetic

    out = []
    for i in range(n):
        s = synthetic.make_sample(seed, i)
        out.append({"uid": f"bench-{i}", "images": [synthetic.encode_png(s.image)], "conversations": [
            {"from": "human", "value": "<image>\n" + s.prompt}, {"from": "gpt", "value": s.answer}]})
    return out


def bench_post_sft(args):
    """Stage-2 steps through ``training/post_sft.py`` (RoI pass -> host crop + splice -> train step) on random
    weights, each part timed on its own (the device is synchronised after each, which a training run does not
    do), ``--batch`` rows per step at ``--post-sft-tokens`` visual tokens per image (min = max pixels). At
    ``--size qwen2_5vl_7b``: an ahead-of-time compile of the RoI pass and of the train step on abstract
    inputs over ``--fsdp`` devices (one row per device, full remat), with XLA's memory analysis."""
    import ml_collections

    from qzoom_jax.checkpoints.embedded import EMBEDDED_DEFAULT
    from qzoom_jax.data import conversations, pipeline
    from qzoom_jax.data.processor import Processor
    from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
    from qzoom_jax.models.qzoom import twig as twig_lib
    from qzoom_jax.models.vlm import as_dtype, init_params
    from qzoom_jax.runtime import parallel
    from qzoom_jax.training import metrics, post_sft, sft

    real = args.size == "qwen2_5vl_7b"
    config = _qwen7b_config() if real else QwenVLConfig.from_dict(_hf_config(args.size).to_dict())
    K, T = TWIG[args.size]
    devices = jax.devices()[:args.fsdp] if real else jax.devices()[:1]
    mesh = parallel.make_mesh(devices=devices)
    dtype = as_dtype(args.dtype)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(args.seed), dtype))
    patterns = post_sft.trainable_patterns(config, ("model/layers/", "lm_head/"), "train")
    optim = ml_collections.ConfigDict(dict(lr=1e-6, warmup_ratio=0.03, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                           clip_norm=1.0))
    tx = optim_lib.make_optimizer(optim, 1000)
    loss = functools.partial(sft.loss_fn, compute_dtype=args.dtype, remat="full" if real else "none",
                             chunk=1024, activations=step_lib.batch_sharding(mesh))
    train_step = step_lib.make_train_step(config, tx, None, None, args.attn_impl, loss, weight="supervised_tokens")
    roi = jax.jit(functools.partial(post_sft.roi_scores, config=config, K=K, attn_impl=args.attn_impl,
                                    compute_dtype=args.dtype), out_shardings=step_lib.batch_sharding(mesh))
    pixels = args.post_sft_tokens * 28 * 28
    if real:
        return _post_sft_abstract(config, shapes, patterns, tx, train_step, roi, mesh, K, T, args.post_sft_tokens)

    params = jax.jit(lambda: init_params(config, jax.random.key(args.seed), dtype),
                     out_shardings=param_axes.param_shardings(shapes, mesh))()
    twig = twig_lib.init_twig_params(params["model"]["layers"], K, T)
    trainable, frozen = sft.split(params, sft.trainable_mask(params, patterns))
    state = step_lib.state_for(trainable, tx, mesh)
    processor = Processor.from_pretrained(EMBEDDED_DEFAULT)
    records = _post_sft_records(args.batch * (args.repeats + 1), args.seed)
    source = post_sft.Indexed(records)
    example = functools.partial(post_sft.example, processor=processor, config=config, min_pixels=pixels,
                                max_pixels=pixels, chat_format="upstream")
    bucket_of = functools.partial(conversations.bucket_of, processor=processor, max_len=8192,
                                  max_patches=1 << 16, max_images=1, min_pixels=pixels, max_pixels=pixels)
    data_iter, _ = pipeline.bucketed_loader(source, example, bucket_of, global_batch_size=args.batch,
                                            seed=args.seed)
    batches = post_sft.RoiBatches(data_iter, records, processor, config, mesh, parallel.DEFAULT_RULES,
                                  lambda: state, frozen, twig, K=K, attn_impl=args.attn_impl,
                                  compute_dtype=args.dtype, threshold=0.1, min_pixels=pixels, max_pixels=pixels,
                                  max_len=8192, max_patches=1 << 16, workers=2)
    compiled, times = {}, []
    for i in range(args.repeats + 1):
        batch = next(batches)
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        t0 = time.perf_counter()
        if key not in compiled:
            compiled[key] = step_lib.compile_step(train_step, state, frozen, batch, None, mesh)
        t1 = time.perf_counter()
        state, m = compiled[key][0](state, frozen, batch, None)
        jax.block_until_ready(m["loss"])
        split = batches.metrics(0.0)
        times.append({"roi_s": split["time_roi_s"], "crop_s": split["time_crop_s"],
                      "step_s": time.perf_counter() - t1, "compile_s": t1 - t0, "roi_rate": split["roi_rate"]})
    batches.close()
    steady = times[1:]
    med = {k: float(np.median([t[k] for t in steady])) for k in ("roi_s", "crop_s", "step_s")}
    total = sum(med.values())
    flops = next(iter(compiled.values()))[1]
    return dict(K=K, T=T, visual_tokens=args.post_sft_tokens, **med, total_s=total,
                samples_per_s=args.batch / total, roi_rate=float(np.mean([t["roi_rate"] for t in steady])),
                share={k: v / total for k, v in med.items()}, compiled_shapes=len(compiled),
                first_roi_s=times[0]["roi_s"], first_compile_s=times[0]["compile_s"],
                mfu=metrics.mfu(flops, med["step_s"], mesh.size, metrics.peak_flops_per_device(devices[0])),
                device=devices[0].device_kind)


def _post_sft_abstract(config, shapes, patterns, tx, train_step, roi, mesh, K: int, T: int, tokens: int):
    """AOT compiles of the 7B RoI pass and train step on abstract sharded inputs: memory and FLOPs."""

    from qzoom_jax.data import conversations
    from qzoom_jax.models.qzoom import twig as twig_lib
    from qzoom_jax.training import metrics, post_sft, sft

    sds = lambda tree, shardings, dtype=None: jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), tree, shardings)
    trainable, frozen = sft.split(shapes, sft.trainable_mask(shapes, patterns))
    master = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), trainable)
    shard = step_lib.state_shardings(master, tx, mesh)
    state = {"params": sds(master, shard["params"]), "opt_state": sds(jax.eval_shape(tx.init, master),
                                                                       shard["opt_state"]),
             "step": jax.ShapeDtypeStruct((), np.int32, sharding=shard["step"])}
    frozen = sds(frozen, param_axes.param_shardings(frozen, mesh))
    twig = jax.eval_shape(lambda layers: twig_lib.init_twig_params(layers, K, T), shapes["model"]["layers"])
    twig = sds(twig, param_axes.param_shardings(twig, mesh))
    side = 2 * int(np.sqrt(tokens))  # a square image of `tokens` merged tokens, and a crop of the same budget
    B, sharding = mesh.size, step_lib.batch_sharding(mesh)

    def batch_of(grids, L: int):
        P = int(sum(np.prod(g) for g in grids)) + (post_sft.MAX_IMAGES - len(grids)) * 4
        P = -(-P // 64) * 64
        layout = conversations.padded_layout(config, np.asarray(grids), P, len(grids), "bench")
        row = {"input_ids": ((L,), np.int32), "attention_mask": ((L,), np.int32), "labels": ((L,), np.int32),
               "positions": ((3, L), np.float32), "pixel_values": ((P, config.vision.patch_dim), np.float32),
               **{f"layout_{k}": (a.shape, a.dtype) for k, a in layout._asdict().items()}}
        return {k: jax.ShapeDtypeStruct((B, *shape), dtype, sharding=sharding) for k, (shape, dtype) in row.items()}

    grid = [1, side, side]
    loader = {k: v for k, v in batch_of([grid], tokens + 128).items() if k != "labels"}
    query = jax.ShapeDtypeStruct((B,), np.int32, sharding=sharding)
    out, t0 = {}, time.perf_counter()
    for name, fn, fn_args in (("roi_pass", roi, (state["params"], frozen, twig, loader, query)),
                              ("train_step", jax.jit(train_step, donate_argnums=0),
                               (state, frozen, batch_of([grid, grid], 2 * tokens + 130), None))):
        traced = fn.trace(*fn_args)
        mem = traced.lower().compile().memory_analysis()
        out[name] = {"per_device_gib": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                        - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / 2 ** 30,
                     "temp_gib": mem.temp_size_in_bytes / 2 ** 30, "tflops": metrics.step_flops(traced) / 1e12}
    return dict(K=K, T=T, visual_tokens=tokens, devices=mesh.size, rows=B, abstract=True,
                jax_compile_s=time.perf_counter() - t0, **out)


BENCHES = {"forward": bench_forward, "generate": bench_generate, "vision": bench_vision, "train": bench_train,
           "qzoom": bench_qzoom,
           "sft_memory": bench_sft_memory, "post_sft": bench_post_sft}


def main(argv=None):
    p = cli.ArgumentParser(prog="python -m qzoom_jax.bench", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    # sft_memory and post_sft (--fsdp devices at 7B) run only when asked for.
    p.add_argument("--only", nargs="*", choices=sorted(BENCHES),
                   default=sorted(set(BENCHES) - {"sft_memory", "post_sft"}))
    p.add_argument("--size", choices=sorted([*SIZES, "qwen2_5vl_7b", "qwen3vl_4b"]), default="small")
    p.add_argument("--image", type=int, default=448, help="square image side in px (multiple of 28)")
    p.add_argument("--text", type=int, default=32, help="text tokens after the image")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--grid", type=int, default=24, help="train: merged image tokens per side (24 = 576)")
    p.add_argument("--large", type=int, default=1024, help="qzoom: the baseline's budget in visual tokens")
    p.add_argument("--small", type=int, default=256, help="qzoom: Q-Zoom's budget in visual tokens")
    p.add_argument("--dtype", default="float32", help="model dtype of every bench (float32, bfloat16)")
    p.add_argument("--attn-impl", default="xla", help="JAX attention: einsum, xla, fused, splash, pallas_gpu, cudnn")
    p.add_argument("--sft-tokens", type=int, default=8192, help="sft_memory: tokens per device")
    p.add_argument("--fsdp", type=int, default=8, help="sft_memory: FSDP devices")
    p.add_argument("--no-pin", action="store_true", help="sft_memory: no batch sharding pinned on activations")
    p.add_argument("--post-sft-tokens", type=int, default=64,
                   help="post_sft: visual tokens of each image and of its crop (stage 2 trains at 576)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args(argv)

    header = dict(size=args.size, batch=args.batch, jax_backend=jax.default_backend(), attn_impl=args.attn_impl)
    rows = []
    compared = [name for name in args.only if name in ("forward", "generate", "vision")]
    if compared:
        hf, ours = _models(args.size, args.seed, args.dtype, args.attn_impl)
        inputs = _inputs(ours.config, args.image, args.text, args.batch, args.seed)
        common = dict(header, image=args.image, seq_len=int(inputs["input_ids"].shape[1]), dtype=args.dtype)
        print(f"{'bench':10s} {'jax (s)':>10s} {'torch (s)':>10s} {'torch/jax':>10s} {'jax compile (s)':>16s}")
        for name in compared:
            row = {"bench": name, **common, **BENCHES[name](hf, ours, inputs, args)}
            print(f"{name:10s} {row['jax_s']:10.4f} {row['torch_s']:10.4f} {row['speedup']:10.2f}x "
                  f"{row['jax_compile_s']:16.2f}")
            rows.append(row)
    if "train" in args.only:
        row = {"bench": "train", **header, "dtype": args.dtype, **bench_train(args)}
        mfu = "n/a (no peak FLOPs for this device)" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"train      {row['step_s']:.4f} s/step  {row['samples_per_s']:.2f} samples/s  MFU {mfu}")
        rows.append(row)
    if "sft_memory" in args.only:
        row = {"bench": "sft_memory", **header, **bench_sft_memory(args)}
        print(f"sft_memory {row['per_device_gib']:.2f} GiB per device (arguments {row['argument_gib']:.2f}, temporaries "
              f"{row['temp_gib']:.2f}) at {row['tokens_per_device']} tokens/device, {row['devices']}-way FSDP")
        rows.append(row)
    if "post_sft" in args.only:
        row = {"bench": "post_sft", **header, "dtype": args.dtype, **bench_post_sft(args)}
        if row.get("abstract"):
            for part in ("roi_pass", "train_step"):
                r = row[part]
                print(f"post_sft {part}: {r['per_device_gib']:.2f} GiB per device (temporaries {r['temp_gib']:.2f}), "
                      f"{row['devices']} devices, one row each (AOT, abstract inputs)")
        else:
            mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
            print(f"post_sft {row['total_s']:.3f} s/step = RoI pass {row['roi_s']:.3f} + host crop "
                  f"{row['crop_s']:.3f} + train step {row['step_s']:.3f}; {row['samples_per_s']:.2f} samples/s; "
                  f"RoI rate {row['roi_rate']:.2f}; train-step MFU {mfu}")
        rows.append(row)
    if "qzoom" in args.only:
        row = {"bench": "qzoom", **header, "dtype": args.dtype, **bench_qzoom(args)}
        print(f"{'per-sample latency':24s} {'seconds':>8s} {'visual tokens':>14s}")
        for name in ("baseline_large", "baseline_small", "qzoom_small_gate_off", "qzoom_small_gate_on",
                     "torch_baseline_large", "torch_baseline_small"):
            r = row[name]
            print(f"{name:24s} {r['latency_s']:8.4f} {r.get('visual_tokens', '')!s:>14s}")
        print("baseline_large / x: " + ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup_vs_baseline_large"].items()))
        print("torch / jax (baseline): " + ", ".join(f"{k} {v:.2f}x" for k, v in row["torch_over_jax"].items()))
        rows.append(row)
    for row in rows:
        line = json.dumps(row)
        print(line)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    with cli.user_errors():
        main()
