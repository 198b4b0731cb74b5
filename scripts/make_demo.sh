#!/usr/bin/env bash
# Rebuilds the built-in demo (assets/demo): a small Llama-architecture model pretrained from
# scratch on Python source and arithmetic word problems, then an MTP adapter for it.
# Takes about 4.5 hours on 2 CPU cores (pretraining 55 min, distillation 5 min, the two
# distilled adapters about 90 min each, the data-trained one 20 min). Usage: scripts/make_demo.sh [MTP_BINARY]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mtp="${1:-$root/target/release/mtp}"
work="${DEMO_WORK:-$(mktemp -d)}"

# Corpus: every top-level .py file of the CPython standard library that runs this script
# (CPython 3.11.7 here: 168 files, 4,698,388 bytes), plus builtin:arith (20,000 problems).
lib="$(python3 -c 'import os, sysconfig; print(sysconfig.get_paths()["stdlib"])')"
mkdir -p "$work/corpus"
cp "$lib"/*.py "$work/corpus/"
ls "$work/corpus" > "$work/corpus-files.txt"

"$mtp" pretrain --data "$work/corpus,builtin:arith" --out "$work/model" --preset demo \
  --vocab-size 4096 --steps 3000 --batch-size 8 --seq-len 256 --lr 1e-3 --warmup 100 \
  --checkpoint-every 250 --val-every 250 --seed 0

# Self-distillation: prompts of 32 tokens cut from the same data (two sets of 8,000 with
# different seeds, and 4,000 from builtin:arith alone, whose answers are short), each
# continued greedily by the model for up to 96 tokens. The adapter learns what the model
# writes, which is what greedy verification accepts.
"$mtp" distill --model "$work/model" --data "$work/corpus,builtin:arith" --out "$work/distilled.jsonl" \
  --sequences 8000 --prompt-tokens 32 --new-tokens 96 --batch-size 32 --seed 0
"$mtp" distill --model "$work/model" --data "$work/corpus,builtin:arith" --out "$work/distilled-2.jsonl" \
  --sequences 8000 --prompt-tokens 32 --new-tokens 96 --batch-size 32 --seed 2
"$mtp" distill --model "$work/model" --data builtin:arith --out "$work/distilled-arith.jsonl" \
  --sequences 4000 --prompt-tokens 32 --new-tokens 96 --batch-size 32 --seed 1

# The adapter (k = 4), with the workbench's default recipe: the residual sampler (METHOD.md
# section 1.3) and the latent-consistency loss as a mean over the width at weight 5 (the
# same weight as the first reading's 0.02 summed over d = 256).
# Draft vocabulary: the 1,024 most frequent target tokens (99.6% of the distilled targets).
# 6,000 steps: at 3,000 acceptance was still rising (4 masks on the benchmark prompts: 2.60
# tokens per forward after 3,000 steps, 2.82 after 6,000).
data="$work/distilled.jsonl,$work/distilled-2.jsonl,$work/distilled-arith.jsonl"
"$mtp" train --model "$work/model" --out "$work/adapter-run" --data "$data" \
  --k 4 --rank 16 --steps 6000 --batch-size 4 --seq-len 128 --lr 1e-3 --warmup 30 --cosine \
  --checkpoint-every 250 --val-every 250 --seed 0 --draft-vocab 1024

# The same without the sampler head (for the ablation numbers), trained before the defaults
# above: the LCM summed over d at weight 0.02.
"$mtp" train --model "$work/model" --out "$work/adapter-run-nosampler" --no-sampler --data "$data" \
  --k 4 --rank 16 --steps 6000 --batch-size 4 --seq-len 128 --lr 1e-3 --warmup 30 --cosine \
  --lcm-reduction sum --lcm-weight 0.02 --checkpoint-every 250 --val-every 250 --seed 0 --draft-vocab 1024

# The comparison: an adapter trained on the data itself instead of the model's outputs
# (the first demo adapter's recipe: 1,200 steps at a constant learning rate).
"$mtp" train --model "$work/model" --data "$work/corpus,builtin:arith" --out "$work/adapter-run-data" \
  --k 4 --rank 16 --steps 1200 --batch-size 4 --seq-len 128 --lr 1e-3 --warmup 30 --lcm-reduction sum --lcm-weight 0.02 \
  --checkpoint-every 200 --val-every 200 --seed 0 --draft-vocab 1024

mkdir -p "$root/assets/demo/model"
for f in config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json pretrain.json metrics.jsonl; do
  cp "$work/model/$f" "$root/assets/demo/model/"
done
cp "$work/corpus-files.txt" "$root/assets/demo/model/"
cp "$work/adapter-run/adapter.safetensors" "$root/assets/demo/"
cp "$work/adapter-run/config.json" "$root/assets/demo/adapter-recipe.json"
cp "$work/adapter-run/metrics.jsonl" "$root/assets/demo/adapter-metrics.jsonl"
cp "$work/adapter-run-nosampler/adapter.safetensors" "$root/assets/demo/adapter-nosampler.safetensors"
cp "$work/adapter-run-data/adapter.safetensors" "$root/assets/demo/adapter-data.safetensors"
cp "$work/adapter-run-data/config.json" "$root/assets/demo/adapter-data-recipe.json"
echo "demo written to $root/assets/demo (work folder $work)"
