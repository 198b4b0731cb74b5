#!/usr/bin/env bash
# The cost of one speculative step relative to one AR step, for a randomly initialised
# model of a real shape and an (untrained) adapter with k = 8: acceptance is then ~0, so
# tokens per forward is ~1 and the end-to-end ratio is 1 / step cost. The speedup a trained
# adapter gets is about tokens-per-forward / step cost. For vocabularies over 4096 tokens it
# runs twice: with a draft vocabulary of 4096 tokens (what `mtp train` stores by default)
# and drafting from the whole vocabulary (`--full-vocab-drafts`).
# FORM chooses how steps apply the adapter (auto, low-rank, merged: `mtp bench --lora-form`),
# ARITH the arithmetic of the mask rows (auto, exact, bf16: `mtp bench --draft-arithmetic`).
#   scripts/bench_step.sh [SHAPE=smollm2-135m] [DEVICE=cpu] [DTYPE=f32] [MTP=target/release/mtp] [MASKS=1,2,4,8] [FORM=auto] [ARITH=auto]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
shape="${1:-smollm2-135m}"; device="${2:-cpu}"; dtype="${3:-f32}"; mtp="${4:-$root/target/release/mtp}"
masks="${5:-1,2,4,8}"; form="${6:-auto}"; arith="${7:-auto}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python="${PYTHON:-$root/.venv/bin/python}"
"$python" "$root/scripts/bench_ar.py" --shape "$shape" --dtype "$dtype" --mtp "$mtp" --save "$work/model" >/dev/null
"$mtp" train --model "$work/model" --data builtin:code:200 --out "$work/run" --k 8 --steps 1 --batch-size 1 \
  --seq-len 16 --device "$device" --dtype "$dtype" --val-fraction 0 --checkpointing off >/dev/null 2>&1
vocab="$("$python" -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$work/model/config.json")"
if [ "$vocab" -gt 4096 ]; then
  # Token-id lines whose targets cover 4096 distinct ids, as a real training set would.
  "$python" - "$work/ids.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(0, 4096, 64):
        f.write(json.dumps({"prompt_ids": [1, 2], "completion_ids": list(range(i, i + 64))}) + "\n")
PY
  "$mtp" draft-vocab --model "$work/model" --adapter "$work/run/adapter.safetensors" --data "$work/ids.jsonl" \
    --size 4096 --device "$device" --dtype "$dtype" >/dev/null 2>&1
fi
printf '{"prompt": "def add(a, b):", "domain": "code"}\n{"prompt": "Question: 3 + 4 =", "domain": "math"}\n' > "$work/prompts.jsonl"
run() {
  "$mtp" bench --model "$work/model" --adapter "$work/run/adapter.safetensors" --prompts "$work/prompts.jsonl" \
    --masks "$masks" --modes ar,linear,quadratic --max-new-tokens 32 --device "$device" --dtype "$dtype" \
    --lora-form "$form" --draft-arithmetic "$arith" --repeats 3 --json "$@"
}
if [ "$vocab" -gt 4096 ]; then
  printf '{"shape": "%s", "draft_vocab": ' "$shape"; run; printf ', "full_vocab": '; run --full-vocab-drafts; printf '}\n'
else
  printf '{"shape": "%s", "full_vocab": ' "$shape"; run; printf '}\n'
fi
