#!/usr/bin/env python3
"""AR decode speed: our `mtp generate` against transformers `generate`, same model, same
prompt, same machine, measured in one run.

The model is randomly initialised with the published shape of a real checkpoint (no
download): SmolLM2-135M by default, or Llama-3.1-8B. Both sides decode greedily for exactly
--new-tokens tokens (EOS ignored) after the same prompt; each is timed --repeats times after
a warm-up and the median is reported. Our time is the generation only (model loading
excluded), as is transformers' (`generate` on an already loaded model).

  .venv/bin/python scripts/bench_ar.py --mtp target/release/mtp [--shape smollm2-135m]
      [--device cpu|cuda] [--dtype f32|bf16] [--new-tokens 64] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parent.parent

# Published configs (config.json of the hub repos), shapes only.
SHAPES = {
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
}
# A launch-bound proxy: many thin layers, whose time is the number of operations (it stands
# in for a small model on a GPU when measured on a CPU).
SHAPES["proxy-64x24"] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=24,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
)
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def make_model(shape: str, dtype: torch.dtype, folder: Path):
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(folder)
    # Any tokenizer will do for --prompt-ids: the fixture one.
    fixture = ROOT / "tests" / "fixtures" / "models" / "llama"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((fixture / name).read_bytes())
    return model


def time_transformers(model, prompt: list[int], n: int, repeats: int, device: str) -> list[float]:
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    model.generate(ids, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert out.shape[1] == len(prompt) + n, out.shape
    return times


def time_ours(mtp: str, folder: Path, prompt: list[int], n: int, repeats: int, device: str, dtype: str) -> list[float]:
    cmd = [mtp, "generate", "--model", str(folder), "--prompt-ids", ",".join(map(str, prompt)),
           "--max-new-tokens", str(n), "--ignore-eos", "--device", device, "--dtype", dtype, "--json"]
    times = []
    for i in range(repeats + 1):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"mtp failed:\n{done.stderr}")
        out = json.loads(done.stdout)
        assert len(out["token_ids"]) == n, out
        if i > 0:  # the first run warms up caches and the allocator
            times.append(out["total_seconds"])
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mtp", required=True, help="path to the mtp binary (build with --release)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--save", help="only write the random model folder here (for other benchmarks) and exit")
    args = p.parse_args()
    if args.save:
        folder = Path(args.save)
        folder.mkdir(parents=True, exist_ok=True)
        make_model(args.shape, DTYPES[args.dtype], folder)
        print(folder)
        return

    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    prompt = list(range(3, 3 + args.prompt_len))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_model(args.shape, DTYPES[args.dtype], folder).to(dev).eval()
        with torch.no_grad():
            theirs = time_transformers(model, prompt, args.new_tokens, args.repeats, dev)
        del model
        ours = time_ours(args.mtp, folder, prompt, args.new_tokens, args.repeats, args.device, args.dtype)

    t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
    result = {
        "shape": args.shape,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_len,
        "new_tokens": args.new_tokens,
        "ours_tokens_per_second": args.new_tokens / t_ours,
        "transformers_tokens_per_second": args.new_tokens / t_theirs,
        "speedup": t_theirs / t_ours,
        "ours_seconds": ours,
        "transformers_seconds": theirs,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
