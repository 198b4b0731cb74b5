"""How much a step's int8 mask-row arithmetic moves a real model's predictions.

Every linear layer of the model (the LM head too) multiplies its rows as the CPU's int8 tiles
do (`core/src/model/int8.rs`): each row of inputs scaled by its largest magnitude to
`[-X, X]` and rounded, each output row of the weight to `[-W, W]`, the products summed
exactly. Over real text the next-token argmax is compared with f32's, on every position and on
the confident ones (f32's top probability over 0.5, where drafts are accepted), for the
levels our kernels use: weights at 127 (AVX-512 VNNI, and AVX2 for models read from memory)
and at 32 (AVX2's short panels for models that fit a cache), inputs at 127.

  .venv/bin/python scripts/int8_agreement.py --model DIR [--tokens 512]

DIR is a transformers model folder (SmolLM2-135M-Instruct from scripts/smollm2.py). The text:
this repository's README.md and ../shared/METHOD.md, and the standard library's json/decoder.py.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# (weight levels, input levels)
LEVELS = [(127, 127), (64, 127), (32, 127)]


def quantized(x: torch.Tensor, levels: int) -> torch.Tensor:
    """`x` rounded per row (last dimension) to `levels` steps of its largest magnitude."""
    top = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return (x / top * levels).round().clamp(-levels, levels) * top / levels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=512, help="tokens of each text")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    root = Path(__file__).resolve().parent.parent
    files = [root / "README.md", root.parent / "shared" / "METHOD.md", Path(json.__file__).parent / "decoder.py"]
    texts = [f.read_text()[: 12 * args.tokens] for f in files if f.exists()]
    chunks = [tokenizer(t, return_tensors="pt").input_ids[:, : args.tokens] for t in texts]

    linear = torch.nn.Linear.forward
    state: dict = {"levels": None, "weights": {}}

    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if state["levels"] is None:
            return linear(self, x)
        w_levels, x_levels = state["levels"]
        key = (id(self), w_levels)
        if key not in state["weights"]:
            state["weights"][key] = quantized(self.weight, w_levels)
        return torch.nn.functional.linear(quantized(x, x_levels), state["weights"][key], self.bias)

    torch.nn.Linear.forward = forward
    with torch.no_grad():
        reference = [model(c).logits[0] for c in chunks]
        tokens = sum(r.shape[0] for r in reference)
        print(f"{len(chunks)} texts, {tokens} positions ({os.path.basename(args.model.rstrip('/'))})")
        for levels in LEVELS:
            state["levels"] = levels
            agree = confident = confident_agree = 0
            for c, r in zip(chunks, reference):
                same = model(c).logits[0].argmax(-1) == r.argmax(-1)
                sure = r.softmax(-1).amax(-1) > 0.5
                agree += same.sum().item()
                confident += sure.sum().item()
                confident_agree += same[sure].sum().item()
            print(
                f"weights {levels[0]:3d} levels, inputs {levels[1]:3d}: argmax as f32's on "
                f"{agree / tokens:.4f} of all positions, {confident_agree / max(confident, 1):.4f} "
                f"of the {confident} confident ones"
            )


if __name__ == "__main__":
    main()
