#!/usr/bin/env python3
"""Reference fixtures from the Hugging Face stack (torch + transformers + tokenizers).

Two modes:

  python scripts/reference.py fixtures [--out tests/fixtures]
      Makes the tiny random models the Rust tests load (one per supported family, plus a
      sharded one, one with Llama-3 rope scaling and tied embeddings, and f32/bf16/f16
      storage), and records their reference logits, greedy continuations, prompt encodings
      and rendered chat templates. The output is committed; tests then run without Python.

  python scripts/reference.py check-model DIR --mtp target/release/mtp
      Loads a model folder this project wrote (`mtp pretrain`) with transformers and checks
      that its logits match ours within 1e-4 and its greedy continuation exactly.

  python scripts/reference.py mtp-parity [--out tests/fixtures]
      The method of ../shared/METHOD.md written again in PyTorch on top of the transformers
      model (Fig. 4 layout by plain loops, gated LoRA as forward hooks, the sampler head,
      the three losses): records a random non-zero adapter, a batch, the losses and every
      trainable gradient, which tests/mtp_parity.rs compares with ours.

  python scripts/reference.py train-bench --mtp target/release/mtp [--steps 20]
      Training speed of that PyTorch reference against `mtp train` on the same model, data,
      k and batch, on the same machine.

  python scripts/reference.py crosscheck --mtp target/release/mtp [--seed 1234]
      Makes fresh tiny models the same way with another seed in a temporary folder and
      checks that `mtp generate --json` reproduces transformers' greedy tokens exactly, with
      --prompt-ids and with --prompt. Exits non-zero on any mismatch.

  python scripts/reference.py uno-check --mtp target/release/mtp [--out tests/fixtures]
      For each family (llama, mistral, qwen2, qwen3): trains a small adapter of the UNO
      recipe on the fixture model (`mtp train --recipe uno`), exports it (`mtp export
      --format peft`), loads the export with PEFT onto the transformers model (no missing,
      no unexpected keys), and runs UNO's draft step written here from its description
      (prompt and seed row with the base weights, the random-id rows with base + LoRA,
      causal, the LM head's argmax at each row) with the random ids `mtp generate --json`
      reports; its drafts must equal ours. Writes tests/fixtures/reference/uno-FAMILY.*,
      which tests/uno.rs checks without Python. Exits non-zero on any mismatch.

Run with the project's environment: .venv/bin/python scripts/reference.py fixtures
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_VOCAB = 400
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

# A ChatML template with a default system turn, exercising loops, conditionals, string
# methods and raise_exception the way hub templates do.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set system = 'You are a helpful assistant.' -%}{%- set rest = messages -%}{%- endif -%}"
    "{{ bos_token }}<|im_start|>system\n{{ system | trim }}<|im_end|>\n"
    "{%- for m in rest -%}"
    "{%- if m['role'] not in ['user', 'assistant'] -%}{{ raise_exception('unknown role ' + m['role']) }}{%- endif -%}"
    "\n<|im_start|>{{ m['role'] }}\n{{ m['content'].strip() }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}\n<|im_start|>assistant\n{%- endif -%}"
)

# Llama-3 style: header tokens spelled out, eos after every turn.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n\n' + message['content'] | trim + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}"
)

CHAT_MESSAGES = [
    {"role": "system", "content": "  Answer briefly.  "},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 4 * 6?"},
]

TEXT_PROMPT = "def add(a, b):\n    return a +"


def corpus() -> list[str]:
    """A fixed slice of the Python standard library: the same files on every CPython 3.11."""
    lib = Path(os.__file__).parent
    names = ["textwrap.py", "bisect.py", "heapq.py", "colorsys.py", "keyword.py", "this.py"]
    return [(lib / n).read_text(encoding="utf-8") for n in names if (lib / n).exists()]


def make_tokenizer(add_bos: bool, template: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>" if not add_bos else "</s>",
        unk_token="<unk>",
        chat_template=template,
    )


def base_kwargs(vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )


def families() -> dict[str, dict]:
    """Name -> how to build it. `v4_config` rewrites rope keys the way transformers 4.x
    (and most hub checkpoints) spell them."""
    llama3_rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    return {
        "llama": dict(
            cls="LlamaConfig", cfg=dict(base_kwargs(416)), bos=True, template=CHATML_TEMPLATE,
            dtype=torch.float32, v4_config=True,
        ),
        "llama3-tied": dict(
            cls="LlamaConfig",
            cfg=dict(base_kwargs(400), tie_word_embeddings=True, rope_parameters=llama3_rope),
            bos=True, template=LLAMA3_TEMPLATE, dtype=torch.bfloat16, v4_config=True,
        ),
        "llama-sharded": dict(
            cls="LlamaConfig", cfg=dict(base_kwargs(400), attention_bias=True, mlp_bias=True),
            bos=True, template=CHATML_TEMPLATE, dtype=torch.float32, shard="40KB",
        ),
        "mistral": dict(
            cls="MistralConfig", cfg=dict(base_kwargs(400), sliding_window=4096),
            bos=True, template=CHATML_TEMPLATE, dtype=torch.float16,
        ),
        "qwen2": dict(
            cls="Qwen2Config",
            cfg=dict(base_kwargs(400), tie_word_embeddings=True, eos_token_id=4, bos_token_id=None),
            bos=False, template=CHATML_TEMPLATE, dtype=torch.float32,
        ),
        "qwen3": dict(
            cls="Qwen3Config",
            cfg=dict(base_kwargs(420), head_dim=32, eos_token_id=4, bos_token_id=None),
            bos=False, template=CHATML_TEMPLATE, dtype=torch.bfloat16,
        ),
    }


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norms around 1 and biases non-zero, so that a loader that
    drops a tensor or a forward that skips one cannot match the reference by luck."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.15 * noise)


def to_v4(folder: Path) -> None:
    """Spell the rope keys and the chat template the transformers 4.x way: `rope_theta` and
    `rope_scaling` in config.json, `chat_template` inside tokenizer_config.json."""
    config_path = folder / "config.json"
    cfg = json.loads(config_path.read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    template_file = folder / "chat_template.jinja"
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["chat_template"] = template_file.read_text()
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    template_file.unlink()


def build(name: str, spec: dict, seed: int, folder: Path) -> None:
    torch.manual_seed(seed)
    cfg = getattr(transformers, spec["cls"])(**spec["cfg"])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.to(spec["dtype"]).save_pretrained(folder, max_shard_size=spec.get("shard", "1GB"))
    make_tokenizer(spec["bos"], spec["template"]).save_pretrained(folder)
    # Round-trip through AutoTokenizer: transformers 5 replaces some families' pre-tokenizer
    # in memory (Qwen2: NFC + a split regex); saving it again puts what transformers really
    # uses into tokenizer.json, as hub checkpoints have it.
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    if spec.get("v4_config"):
        to_v4(folder)


def top2_margin(scores: torch.Tensor) -> float:
    top = scores.float().topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, output_scores=True,
        return_dict_in_generate=True, pad_token_id=0,
    )
    new = out.sequences[0, len(ids):].tolist()
    margin = min(top2_margin(s) for s in out.scores)
    return new, margin


def reference(folder: Path, seed: int, n_new: int = 24) -> tuple[dict, dict[str, torch.Tensor]]:
    """Reference record for one model folder: JSON-able facts and the logits tensors."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed + 7)
    logits_ids = torch.randint(0, TOKENIZER_VOCAB, (1, 20), generator=g)
    with torch.no_grad():
        logits = model(logits_ids).logits[0].float().contiguous()

    # Greedy from random prompt ids; retry with a new prompt until every step has a clear
    # top-2 margin, so that float rounding cannot decide a tie.
    for attempt in range(50):
        prompt_ids = torch.randint(0, TOKENIZER_VOCAB, (8,), generator=g).tolist()
        new_ids, margin = greedy(model, prompt_ids, n_new)
        if margin > 5e-3:
            break
    else:
        raise SystemExit(f"{folder}: no prompt with a clear greedy margin")

    text_ids = tok(TEXT_PROMPT)["input_ids"]
    text_new, text_margin = greedy(model, text_ids, n_new)
    rendered = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    record = {
        "model_type": model.config.model_type,
        "vocab_size": vocab,
        "num_parameters": model.num_parameters(),
        "logits_input_ids": logits_ids[0].tolist(),
        "greedy": {"prompt_ids": prompt_ids, "token_ids": new_ids, "min_margin": margin},
        "text": {
            "prompt": TEXT_PROMPT,
            "prompt_ids": text_ids,
            "token_ids": text_new,
            "min_margin": text_margin,
            "decoded": tok.decode(text_new),
        },
        "chat": {"messages": CHAT_MESSAGES, "rendered": rendered},
        "eos_token_ids": model.generation_config.eos_token_id,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    return record, {"logits": logits}


def cmd_fixtures(args) -> None:
    out = Path(args.out)
    models_dir, ref_dir = out / "models", out / "reference"
    for d in (models_dir, ref_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    for i, (name, spec) in enumerate(families().items()):
        folder = models_dir / name
        build(name, spec, seed=args.seed + i, folder=folder)
        record, tensors = reference(folder, seed=args.seed + i)
        record["family"] = name
        (ref_dir / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        save_file(tensors, str(ref_dir / f"{name}.safetensors"))
        print(f"{name}: {record['num_parameters']} parameters, greedy margin {record['greedy']['min_margin']:.4f}")


def run_mtp(mtp: str, folder: Path, extra: list[str]) -> dict:
    cmd = [mtp, "generate", "--model", str(folder), "--max-new-tokens", "24", "--json", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def cmd_crosscheck(args) -> None:
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, spec) in enumerate(families().items()):
            folder = Path(tmp) / name
            build(name, spec, seed=args.seed + i, folder=folder)
            record, _ = reference(folder, seed=args.seed + i)
            ids = ",".join(map(str, record["greedy"]["prompt_ids"]))
            ours = run_mtp(args.mtp, folder, ["--prompt-ids", ids])
            ok_ids = ours["token_ids"] == record["greedy"]["token_ids"]
            ours_text = run_mtp(args.mtp, folder, ["--prompt", TEXT_PROMPT])
            ok_text = (
                ours_text["prompt_ids"] == record["text"]["prompt_ids"]
                and ours_text["token_ids"] == record["text"]["token_ids"]
            )
            print(f"{name}: --prompt-ids {'ok' if ok_ids else 'MISMATCH'}, --prompt {'ok' if ok_text else 'MISMATCH'}")
            if not ok_ids:
                print(f"  reference {record['greedy']['token_ids']}\n  ours      {ours['token_ids']}")
            if not ok_text:
                print(f"  reference {record['text']['prompt_ids']} -> {record['text']['token_ids']}")
                print(f"  ours      {ours_text['prompt_ids']} -> {ours_text['token_ids']}")
            failures += (not ok_ids) + (not ok_text)
    if failures:
        raise SystemExit(f"{failures} mismatches")
    print("all families match transformers")


def cmd_check_model(args) -> None:
    from safetensors.torch import load_file

    folder = Path(args.folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(args.prompt)["input_ids"]
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].float()
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "logits.safetensors"
        ours_json = run_mtp(args.mtp, folder, ["--prompt", args.prompt, "--dump-logits", str(dump)])
        ours = load_file(str(dump))["logits"]
    new_ids, margin = greedy(model, ids, 24)
    diff = float((ours - theirs).abs().max())
    same_prompt = ours_json["prompt_ids"] == ids
    same_tokens = ours_json["token_ids"] == new_ids
    print(f"{folder}: max |logit diff| {diff:.2e}; prompt ids {'equal' if same_prompt else 'DIFFER'}; "
          f"greedy tokens {'equal' if same_tokens else 'DIFFER'} (min top-2 margin {margin:.4f})")
    print(f"  transformers: {tok.decode(new_ids)!r}")
    if diff > 1e-4 or not same_prompt or not same_tokens:
        raise SystemExit("mismatch")


# ---------------------------------------------------------------- the method in PyTorch

PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100


def layout(ids: list[int], loss: list[bool], k: int) -> dict:
    """METHOD.md section 2 by plain loops: after each position whose next token carries
    loss, a block m_1..m_k. Row fields: token (NTP) or 0, slot, block, position, label,
    prev (teacher-forced previous token), lcm target row (or -1)."""
    n = len(ids)
    loss = [loss[i] and i < n - 1 for i in range(n)]
    rows, ntp_row = [], {}
    for i in range(n):
        ntp_row[i] = len(rows)
        rows.append(dict(token=ids[i], slot=0, block=i))
        if loss[i]:
            for j in range(1, k + 1):
                rows.append(dict(token=0, slot=j, block=i))
    for r in rows:
        t = r["block"] + r["slot"]  # the position whose next token is the label
        valid = t < n - 1 and loss[t]
        r["position"] = t
        r["label"] = ids[t + 1] if valid else IGNORE
        r["prev"] = ids[min(t, n - 1)]
        r["lcm"] = ntp_row[t] if (valid and r["slot"] > 0) else -1
    L = len(rows)
    mask = torch.zeros(L, L, dtype=torch.bool)
    for a, ra in enumerate(rows):
        for b, rb in enumerate(rows):
            if rb["slot"] == 0:
                mask[a, b] = rb["block"] <= ra["block"]
            else:
                mask[a, b] = ra["slot"] > 0 and rb["block"] == ra["block"] and rb["slot"] <= ra["slot"]
    return dict(rows=rows, mask=mask)


class Reference(torch.nn.Module):
    """Mask embeddings, gated LoRA (as hooks on the frozen model) and the sampler head."""

    def __init__(self, model, k: int, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        cfg = model.config
        d = cfg.hidden_size
        self.model, self.k, self.scale = model, k, alpha / rank
        for p in model.parameters():
            p.requires_grad_(False)
        self.mask_embeddings = torch.nn.Parameter(torch.randn(k, d, generator=gen) * 0.2, requires_grad=False)
        self.lora = torch.nn.ParameterDict()
        for i, layer in enumerate(model.model.layers):
            for name in PROJS:
                mod = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
                a = torch.randn(rank, mod.in_features, generator=gen) * 0.2
                b = torch.randn(mod.out_features, rank, generator=gen) * 0.2
                self.lora[f"{i}_{name}_A"] = torch.nn.Parameter(a)
                self.lora[f"{i}_{name}_B"] = torch.nn.Parameter(b)
                mod.register_forward_hook(self._hook(i, name))
        self.fc1 = torch.nn.Linear(2 * d, d)
        self.ln1 = torch.nn.LayerNorm(d)
        self.fc2 = torch.nn.Linear(d, d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.gate = None

    def _hook(self, i, name):
        def hook(mod, inputs, out):
            a, b = self.lora[f"{i}_{name}_A"], self.lora[f"{i}_{name}_B"]
            x = inputs[0]
            # f32 master weights computing in the activations' dtype, as ours do.
            return out + ((x @ a.T.to(x.dtype)) * self.gate.to(x.dtype)) @ b.T.to(x.dtype)
        return hook

    def sampler(self, prev_embed, z):
        x = torch.cat([prev_embed, z], -1).to(self.fc1.weight.dtype)
        h = self.ln1(torch.nn.functional.silu(self.fc1(x)))
        return self.ln2(torch.nn.functional.silu(self.fc2(h)))

    def named_tensors(self) -> dict:
        """Our adapter's tensor names."""
        out = {"mask_embeddings": self.mask_embeddings}
        for key, p in self.lora.items():
            i, rest = key.split("_", 1)
            proj, ab = rest.rsplit("_", 1)
            out[f"lora.layers.{i}.{proj}.{ab}"] = p
        for n in ["fc1", "ln1", "fc2", "ln2"]:
            m = getattr(self, n)
            out[f"sampler.{n}.weight"] = m.weight
            out[f"sampler.{n}.bias"] = m.bias
        return out

    def losses(self, ids, loss, lcm_weight, lay=None):
        """The three losses of one sequence (`lay`: a precomputed layout of it). Runs on the
        device of the adapter's parameters."""
        lay = lay or layout(ids, loss, self.k)
        rows = lay["rows"]
        m = self.model
        dev = self.mask_embeddings.device
        tok = torch.tensor([[r["token"] for r in rows]], device=dev)
        slot = torch.tensor([r["slot"] for r in rows], device=dev)
        x = m.model.embed_tokens(tok)
        is_mask = (slot > 0).view(1, -1, 1)
        x = torch.where(is_mask, self.mask_embeddings[(slot - 1).clamp(min=0)].unsqueeze(0).to(x.dtype), x)
        self.gate = (slot > 0).float().view(1, -1, 1) * self.scale
        pos = torch.tensor([[r["position"] for r in rows]], device=dev)
        pe = m.model.rotary_emb(x, position_ids=pos)
        mask = lay["mask"].to(dev)
        h = x
        for layer in m.model.layers:
            h = layer(h, attention_mask=mask.view(1, 1, *mask.shape), position_embeddings=pe, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        z = m.model.norm(h)[0]
        labels = torch.tensor([r["label"] for r in rows], device=dev)
        valid = labels != IGNORE
        on_mask = valid & (slot > 0)
        base = torch.nn.functional.cross_entropy(m.lm_head(z[on_mask]).float(), labels[on_mask])
        prev = torch.tensor([r["prev"] for r in rows], device=dev)
        s = self.sampler(m.model.embed_tokens(prev[valid]), z[valid])
        sampler = torch.nn.functional.cross_entropy(m.lm_head(s.to(z.dtype)).float(), labels[valid])
        # LCM: each mask row toward its (detached) NTP row; mean per NTP row, then mean.
        target = torch.tensor([r["lcm"] for r in rows], device=dev)
        src = (target >= 0).nonzero().view(-1)
        tgt = target[src]
        dist = ((z[tgt].detach().float() - z[src].float()) ** 2).sum(-1)
        sums = torch.zeros(len(rows), device=dev).index_add(0, tgt, dist)
        counts = torch.zeros(len(rows), device=dev).index_add(0, tgt, torch.ones_like(dist))
        present = counts > 0
        lcm = (sums[present] / counts[present]).mean()
        total = base + sampler + lcm_weight * lcm
        return dict(loss=total, loss_base=base, loss_sampler=sampler, loss_lcm=lcm)


PARITY = dict(family="llama", k=3, rank=4, alpha=8.0, lcm_weight=0.5, seed=11)


def cmd_mtp_parity(args) -> None:
    folder = Path(args.out) / "models" / PARITY["family"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(PARITY["seed"])
    ref = Reference(model, PARITY["k"], PARITY["rank"], PARITY["alpha"], gen)
    with torch.no_grad():
        for m in [ref.fc1, ref.ln1, ref.fc2, ref.ln2]:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if p.dim() == 1 and m in (ref.ln1, ref.ln2) and p is m.weight else 0.0))
    ids = torch.randint(0, TOKENIZER_VOCAB, (14,), generator=gen).tolist()
    # A chat-like mask: no loss on the first 4 positions.
    loss = [i >= 3 for i in range(len(ids))]
    out = ref.losses(ids, loss, PARITY["lcm_weight"])
    out["loss"].backward()
    tensors = {"ids": torch.tensor(ids), "loss_mask": torch.tensor([int(b) for b in loss])}
    for name, t in ref.named_tensors().items():
        tensors[f"adapter.{name}"] = t.detach().contiguous()
        if t.requires_grad:
            tensors[f"grad.{name}"] = t.grad.detach().contiguous()
    for name, v in out.items():
        tensors[name] = v.detach().reshape(1)
    path = Path(args.out) / "reference" / "mtp_parity.safetensors"
    save_file(tensors, str(path), metadata={k: str(v) for k, v in PARITY.items()})
    print(f"{path}: loss {out['loss'].item():.6f} (base {out['loss_base'].item():.4f}, sampler "
          f"{out['loss_sampler'].item():.4f}, lcm {out['loss_lcm'].item():.4f})")


def cmd_train_bench(args) -> None:
    """PyTorch reference training tokens/s vs `mtp train` on the same model, data, k, device
    and precision (f32 master weights for the trainable parts in both)."""
    import statistics
    import time

    folder = Path(args.model) if args.model else ROOT / "assets" / "demo" / "model"
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(dev).train()
    gen = torch.Generator().manual_seed(0)
    k, seq, batch = args.k, args.seq_len, 1
    # The frozen model keeps its precision; the adapter's parts are made in f32.
    ref = Reference(model, k, 16, 32.0, gen).to(dev)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    # The same data as `mtp train --data builtin:code`: small Python functions.
    text = "".join(f"def count_items(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total\n" for _ in range(40))
    ids = tok(text)["input_ids"][:seq]
    # The layout is built once (plain loops are for clarity, not speed), as ours is cheap.
    lay = layout(ids, [True] * len(ids), k)
    times = []
    for step in range(args.steps):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad()
        out = ref.losses(ids, [True] * len(ids), 1.0, lay)
        out["loss"].backward()
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ref_tps = len(ids) * batch / statistics.median(times[2:])
    del ref, model, opt
    if dev == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [args.mtp, "train", "--model", str(folder), "--data", "builtin:code:400", "--out", f"{tmp}/run",
               "--k", str(k), "--rank", "16", "--steps", str(args.steps), "--batch-size", str(batch),
               "--seq-len", str(seq), "--val-every", "0", "--val-fraction", "0", "--device", args.device,
               "--dtype", args.dtype, "--checkpointing", "off", "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        tps = [json.loads(l)["tokens_per_second"] for l in done.stdout.splitlines() if '"event":"step"' in l]
    ours_tps = statistics.median(tps[2:])
    print(json.dumps({"k": k, "seq_len": seq, "batch": batch, "steps": args.steps, "threads": torch.get_num_threads(),
                      "device": args.device, "dtype": args.dtype,
                      "ours_tokens_per_second": ours_tps, "reference_tokens_per_second": ref_tps,
                      "ours_over_reference": ours_tps / ref_tps}, indent=1))


UNO_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
UNO_MASKS = 3


def mtp_json(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def uno_draft(peft_model, ids: list[int], seed: int, lora: bool = True) -> tuple[list[int], float]:
    """UNO's draft pass: one causal forward over `ids` (prompt, the seed at row `seed`, random
    ids after it, at consecutive positions), the LoRA applied on the rows after the seed only
    (on none without `lora`); the LM head's argmax at the seed row and at every row after it,
    and the smallest top-2 logit margin among them."""
    from peft.tuners.lora import LoraLayer

    gate = torch.zeros(1, len(ids), 1)
    if lora:
        gate[0, seed + 1:] = 1.0

    def gated(self, x, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.lora_A:
                delta = self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]
                out = out + delta * gate.to(out.dtype)
        return out

    saved = []
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            saved.append((module, module.forward))
            module.forward = gated.__get__(module)
    try:
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for module, forward in saved:
            module.forward = forward
    rows = logits[seed:]
    return rows.argmax(-1).tolist(), top2_margin(rows)


def cmd_uno_check(args) -> None:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    out = Path(args.out)
    ref_dir = out / "reference"
    failures = 0
    for name in UNO_FAMILIES:
        folder = out / "models" / name
        record = json.loads((ref_dir / f"{name}.json").read_text())
        adapter = ref_dir / f"uno-{name}.safetensors"
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if not args.keep_adapters or not adapter.exists():
                subprocess.run(
                    [args.mtp, "train", "--model", str(folder), "--data", "builtin:code:400", "--out",
                     str(tmp / "run"), "--recipe", "uno", "--k", str(UNO_MASKS), "--rank", "4", "--alpha", "8",
                     "--steps", "40", "--lr", "1e-2", "--warmup", "2", "--batch-size", "4", "--seq-len", "48",
                     "--val-every", "0", "--checkpoint-every", "1000", "--checkpointing", "off", "--json"],
                    check=True, capture_output=True,
                )
                shutil.copyfile(tmp / "run" / "adapter.safetensors", adapter)
            subprocess.run([args.mtp, "export", "--format", "peft", str(adapter), str(tmp / "peft")],
                           check=True, capture_output=True)
            peft_config = json.loads((tmp / "peft" / "adapter_config.json").read_text())
            weights = load_file(str(tmp / "peft" / "adapter_model.safetensors"))

            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            peft_model = get_peft_model(model, LoraConfig.from_pretrained(str(tmp / "peft"))).eval()
            loaded = set_peft_model_state_dict(peft_model, weights)
            missing = sorted(k for k in loaded.missing_keys if "lora_" in k)
            unexpected = sorted(loaded.unexpected_keys)
            # PEFT's scale is the one we trained with.
            scales = {s for m in peft_model.modules() if isinstance(getattr(m, "scaling", None), dict)
                      for s in m.scaling.values()}

            prompt = record["greedy"]["prompt_ids"]
            ours = mtp_json([args.mtp, "generate", "--model", str(folder), "--adapter", str(adapter), "--mode",
                             "linear", "--masks", str(UNO_MASKS), "--prompt-ids", ",".join(map(str, prompt)),
                             "--max-new-tokens", "12", "--ignore-eos", "--json"])
            noise = ours["bootstrap_noise_ids"]
            first = ours["token_ids"][0]
            # The bootstrap block is the prefill's: the prompt's last token is the seed, the
            # random ids follow it; the first step verifies the drafts they made.
            our_drafts = ours["steps"][0]["drafts"]
            ids = prompt + noise
            rows, margin = uno_draft(peft_model, ids, len(prompt) - 1)
            base_rows, _ = uno_draft(peft_model, ids, len(prompt) - 1, lora=False)
        seed_row, drafts = rows[0], rows[1:]
        checks = {
            "peft loads every key": not missing and not unexpected,
            "PEFT scale = alpha / rank": scales == {peft_config["lora_alpha"] / peft_config["r"]},
            "seed row = our first token": seed_row == first,
            "drafts = ours": drafts == our_drafts,
            "the LoRA changes the drafts": base_rows[1:] != drafts,
        }
        bad = [k for k, ok in checks.items() if not ok]
        failures += len(bad)
        print(f"{name}: {'ok' if not bad else 'FAILED: ' + ', '.join(bad)} (drafts {drafts}, ours {our_drafts}, "
              f"without LoRA {base_rows[1:]}, margin {margin:.4f})")
        fixture = {
            "family": name, "masks": UNO_MASKS, "prompt_ids": prompt, "first": first, "noise_ids": noise,
            "drafts": drafts, "base_drafts": base_rows[1:], "min_margin": margin,
            "peft": {"keys": sorted(weights), "missing": missing, "unexpected": unexpected, "config": peft_config},
            "checks": checks,
        }
        (ref_dir / f"uno-{name}.json").write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")
    if failures:
        raise SystemExit(f"{failures} failed checks")
    print("PEFT loads every export, and UNO's draft step drafts as ours for every family")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixtures")
    f.add_argument("--out", default=str(ROOT / "tests" / "fixtures"))
    f.add_argument("--seed", type=int, default=0)
    mp = sub.add_parser("mtp-parity")
    mp.add_argument("--out", default=str(ROOT / "tests" / "fixtures"))
    tb = sub.add_parser("train-bench")
    tb.add_argument("--mtp", required=True)
    tb.add_argument("--model")
    tb.add_argument("--k", type=int, default=4)
    tb.add_argument("--seq-len", type=int, default=128)
    tb.add_argument("--steps", type=int, default=12)
    tb.add_argument("--device", default="cpu")
    tb.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    m = sub.add_parser("check-model")
    m.add_argument("folder")
    m.add_argument("--mtp", required=True)
    m.add_argument("--prompt", default="def add(a, b):\n    return")
    u = sub.add_parser("uno-check")
    u.add_argument("--mtp", required=True)
    u.add_argument("--out", default=str(ROOT / "tests" / "fixtures"))
    u.add_argument("--keep-adapters", action="store_true", help="reuse the committed adapters, train none")
    c = sub.add_parser("crosscheck")
    c.add_argument("--mtp", required=True)
    c.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    commands = {
        "fixtures": cmd_fixtures, "crosscheck": cmd_crosscheck, "check-model": cmd_check_model,
        "mtp-parity": cmd_mtp_parity, "train-bench": cmd_train_bench,
        "uno-check": cmd_uno_check,
    }
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
