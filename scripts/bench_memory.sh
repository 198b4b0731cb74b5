#!/usr/bin/env bash
# Peak training memory against the estimate (`mtp inspect`, the Model tab, `mtp train`'s
# report), for the demo and a random model of SmolLM2-135M's shape, k = 4, sequence 256,
# batch 2, without and with activation checkpointing, f32 on the CPU. The measured peak is
# the resident memory the run adds to the process (VmHWM less the memory before the model
# is loaded), as `mtp train --json` reports it. Prints a Markdown table.
#   scripts/bench_memory.sh [MTP=target/release/mtp]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mtp="${1:-$root/target/release/mtp}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python="${PYTHON:-$root/.venv/bin/python}"
"$python" "$root/scripts/bench_ar.py" --shape smollm2-135m --dtype f32 --mtp "$mtp" --save "$work/smollm2" >/dev/null
echo "| model | checkpointing | estimate | measured peak | estimate / measured |"
echo "|---|---|---|---|---|"
for model in demo "$work/smollm2"; do
  for ckpt in off on; do
    line="$("$mtp" train --model "$model" --data builtin:code:300 --out "$work/run-$ckpt-$(basename "$model")" \
      --k 4 --seq-len 256 --batch-size 2 --steps 2 --val-every 0 --checkpointing "$ckpt" --json 2>/dev/null | tail -1)"
    "$python" -c '
import json, sys
s = json.loads(sys.argv[1])["summary"]
e, m = s["memory_estimate_bytes"], s["peak_rss_bytes"]
name = "demo" if sys.argv[2] == "demo" else "SmolLM2-135M shape"
print(f"| {name} | {sys.argv[3]} | {e / 2**20:.0f} MiB | {m / 2**20:.0f} MiB | {e / m:.2f} |")
' "$line" "$model" "$ckpt"
  done
done
