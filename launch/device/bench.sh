#!/usr/bin/env bash
# The accelerator benchmarks on one GPU (or TPU chip), in under 8 minutes, into one JSON file.
#
# Usage: bash launch/device/bench.sh [OUT.json]   (default: bench_device.json in the current directory)
#
# Runs `python -m qzoom_jax.bench` at Qwen2.5-VL-7B shapes on random weights, in bf16, each part under its own
# time limit so that one slow part cannot eat the others' time:
#   train     stage-1 (SD-RPN) train step, batch 8, 576 image tokens: samples/s, MFU      (BENCH_TRAIN_S, 150 s)
#   qzoom     per-sample latency, batch 1: baseline at 4096 visual tokens vs Q-Zoom at 576, gate forced on and
#             off, and transformers (sdpa) at the same settings                           (BENCH_QZOOM_S, 200 s)
#   generate  greedy generation, JAX vs transformers, batch 1 and batch 8                  (BENCH_GENERATE_S, 120 s)
#   post_sft  stage-2 RoI pass and train step, whole LLM trainable: an ahead-of-time compile with XLA's memory
#             analysis and the FLOPs (a 7B fp32-master AdamW state is 112 GB: it needs FSDP over several chips
#             to run, so one chip reports the compiled program only)                        (BENCH_POST_SFT_S, 60 s)
# A part that fails or runs out of time is recorded as {"bench": NAME, "error": ...}; the others still run.
# Settings (environment): ATTN_IMPL (default cudnn on a GPU, splash on a TPU), PYTHON (default python3).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi
out="$(realpath -m "${1:-bench_device.json}")"
cd "$(dirname "$0")/../.."
py="${PYTHON:-python3}"

missing=$("$py" - <<'EOF'
import importlib.util
need = ("jax", "flax", "optax", "ml_collections", "einops", "tensorboardX", "orbax.checkpoint", "transformers",
        "torch", "PIL", "tqdm", "safetensors")
print(" ".join(m for m in need if importlib.util.find_spec(m.split(".")[0]) is None))
EOF
)
if [[ -n "$missing" ]]; then
  echo "launch/device/bench.sh: missing Python packages: $missing (pip install -e '.[test]')" >&2
  exit 1
fi
backend=$("$py" -c 'import jax; print(jax.default_backend())')
if [[ "$backend" == "cpu" ]]; then
  echo "launch/device/bench.sh: JAX sees no accelerator (backend cpu); run python -m qzoom_jax.bench --size small here" >&2
  exit 1
fi
attn="${ATTN_IMPL:-$([[ "$backend" == "tpu" ]] && echo splash || echo cudnn)}"

lines=$(mktemp)
trap 'rm -f "$lines"' EXIT
part() {  # part NAME SECONDS ARGS...: one bench under its time limit, its JSON lines appended to $lines
  local name="$1" limit="$2"
  shift 2
  echo "== $name (at most ${limit} s)" >&2
  local before
  before=$(wc -l <"$lines")
  local rc=0
  timeout "$limit" "$py" -m qzoom_jax.bench --only "$name" --size qwen2_5vl_7b --dtype bfloat16 \
    --attn-impl "$attn" --out "$lines" "$@" >&2 || rc=$?
  if [[ $rc -ne 0 && $(wc -l <"$lines") -eq $before ]]; then
    printf '{"bench": "%s", "error": "exit status %d%s"}\n' "$name" "$rc" \
      "$([[ $rc -eq 124 ]] && echo ", over its ${limit} s limit")" >>"$lines"
  fi
}

part train "${BENCH_TRAIN_S:-150}" --batch 8 --grid 24 --repeats 5
part qzoom "${BENCH_QZOOM_S:-200}" --large 4096 --small 576 --repeats 3
part generate "${BENCH_GENERATE_S:-120}" --batch 1 --image 448 --new-tokens 32 --repeats 3
part generate "${BENCH_GENERATE_S:-120}" --batch 8 --image 448 --new-tokens 32 --repeats 3
part post_sft "${BENCH_POST_SFT_S:-60}" --post-sft-tokens 576 --fsdp 1

"$py" - "$lines" "$out" <<'EOF'
import json, os, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
with open(sys.argv[2] + ".tmp", "w") as f:
    json.dump(rows, f, indent=1)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
print(f"wrote {len(rows)} results to {sys.argv[2]}")
EOF
