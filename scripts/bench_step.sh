#!/usr/bin/env bash
# The cost of one speculative decoding step relative to one AR step, for a randomly
# initialised model of a real shape and an (untrained) adapter with k = 8: acceptance is
# then ~0, so tokens per forward is ~1 and the end-to-end ratio is 1 / step cost. The
# speedup a trained adapter gets is about tokens-per-forward / step cost.
#   scripts/bench_step.sh [SHAPE=smollm2-135m] [DEVICE=cpu] [DTYPE=f32] [MTP=target/release/mtp]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
shape="${1:-smollm2-135m}"; device="${2:-cpu}"; dtype="${3:-f32}"; mtp="${4:-$root/target/release/mtp}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python="${PYTHON:-$root/.venv/bin/python}"
"$python" "$root/scripts/bench_ar.py" --shape "$shape" --dtype "$dtype" --mtp "$mtp" --save "$work/model" >/dev/null
"$mtp" train --model "$work/model" --data builtin:code:200 --out "$work/run" --k 8 --steps 1 --batch-size 1 \
  --seq-len 16 --device "$device" --dtype "$dtype" --val-fraction 0 >/dev/null 2>&1
printf '{"prompt": "def add(a, b):", "domain": "code"}\n{"prompt": "Question: 3 + 4 =", "domain": "math"}\n' > "$work/prompts.jsonl"
"$mtp" bench --model "$work/model" --adapter "$work/run/adapter.safetensors" --prompts "$work/prompts.jsonl" \
  --masks 1,2,4,8 --modes ar,linear,quadratic --max-new-tokens 32 --device "$device" --dtype "$dtype" --json
