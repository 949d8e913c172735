"""Train the bundled GPT-2 on Tiny Shakespeare (development only; needs torch + transformers).

Usage: python models/tiny-shakespeare/train.py --data tinyshakespeare.txt \
           --out models/tiny-shakespeare --steps 1100

Data split: the first 90% of the characters train (tokenizer and model), the last 10% are held
out and only evaluated. Writes config.json, model.safetensors (fp16), generation_config.json,
tokenizer.json (+ vocab.json, merges.txt, tokenizer_config.json) and train_log.json into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel

EOT = "<|endoftext|>"


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE in the GPT-2 style, `<|endoftext|>` as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return tok


@torch.no_grad()
def held_out_loss(model, ids: np.ndarray, n_ctx: int, n_chars: int, batch: int = 16) -> dict:
    """Windows of n_ctx tokens overlapping by one, so every token but the first is predicted once."""
    model.eval()
    stride = n_ctx - 1
    windows = [ids[s : s + n_ctx] for s in range(0, max(len(ids) - 1, 1), stride)]
    full = [w for w in windows if len(w) == n_ctx]
    groups = [np.stack(full[i : i + batch]) for i in range(0, len(full), batch)]
    groups += [w[None] for w in windows if 1 < len(w) < n_ctx]  # ragged last window: run alone
    total, count = 0.0, 0
    for g in groups:
        x = torch.from_numpy(g.astype(np.int64))  # (B, T)
        logits = model(x).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return {"nats_per_token": total / count, "nats_per_char": total / n_chars, "tokens": count + 1,
            "chars": n_chars, "chars_per_token": n_chars / (count + 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dropout", type=float, default=0.1, help="residual and embedding dropout")
    ap.add_argument("--attn-dropout", type=float, default=0.0, help="attention-probability dropout (costly on CPU)")
    ap.add_argument("--eval-every", type=int, default=200, help="log held-out loss every N steps (0: only at the end)")
    ap.add_argument("--minutes", type=float, default=45.0)
    ap.add_argument("--steps", type=int, default=0, help="fixed step count (0: estimate from --minutes)")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    text = Path(args.data).read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train_text, val_text = text[:cut], text[cut:]

    tok = train_tokenizer(train_text, args.vocab)
    eot = tok.token_to_id(EOT)
    train_ids = np.array(tok.encode(train_text).ids, dtype=np.int64)
    val_ids = np.array(tok.encode(val_text).ids, dtype=np.int64)
    print(f"train {len(train_ids)} tokens, val {len(val_ids)} tokens, vocab {tok.get_vocab_size()}", flush=True)

    cfg = GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=args.n_ctx, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.attn_dropout,
        activation_function="gelu_pytorch_tanh",  # = gelu_new (tanh approximation), one fused kernel
        bos_token_id=eot, eos_token_id=eot,
    )
    model = GPT2LMHeadModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params/1e6:.2f}M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def batch():
        ix = rng.integers(0, len(train_ids) - args.n_ctx - 1, size=args.batch)
        x = np.stack([train_ids[i : i + args.n_ctx] for i in ix])
        y = np.stack([train_ids[i + 1 : i + 1 + args.n_ctx] for i in ix])
        return torch.from_numpy(x), torch.from_numpy(y)

    def step_fn(lr):
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch()
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    model.train()
    warmup = 100
    t0 = time.time()
    steps = args.steps
    if not steps:  # time 10 warm-up steps, then size the schedule to the budget
        for _ in range(10):
            step_fn(args.lr * 0.01)
        per_step = (time.time() - t0) / 10
        steps = max(200, int(args.minutes * 60 / per_step))
        print(f"{per_step:.3f} s/step -> {steps} steps", flush=True)
    log = []
    t_train = time.time()
    for it in range(steps):
        if it < warmup:
            lr = args.lr * (it + 1) / warmup
        else:
            lr = 0.1 * args.lr + 0.9 * args.lr * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, steps - warmup)))
        loss = step_fn(lr)
        evaluate = bool(args.eval_every) and it > 0 and it % args.eval_every == 0
        if it % 100 == 0 or it == steps - 1 or evaluate:
            entry = {"step": it, "train_loss": loss, "seconds": time.time() - t_train}
            if evaluate:  # monitoring only: nothing is selected by it
                entry["held_out_nats_per_char"] = held_out_loss(model, val_ids, args.n_ctx, len(val_text))["nats_per_char"]
            print(f"step {it}/{steps} " + " ".join(f"{k} {v:.4g}" for k, v in entry.items() if k != "step"), flush=True)
            log.append(entry)
    wall = time.time() - t_train

    val = held_out_loss(model, val_ids, args.n_ctx, len(val_text))
    print(f"held-out: {val}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    prompt = torch.tensor([tok.encode("ROMEO:").ids])
    greedy = model.generate(prompt, max_new_tokens=80, do_sample=False, pad_token_id=eot)
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=80, do_sample=True, temperature=0.8, top_k=50, pad_token_id=eot)
    samples = {"greedy": tok.decode(greedy[0].tolist()), "sampled_t0.8_k50_seed0": tok.decode(sampled[0].tolist())}
    print(json.dumps(samples, indent=1), flush=True)

    model.config.embd_pdrop = model.config.resid_pdrop = model.config.attn_pdrop = 0.0
    model.half().save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2TokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
        "model_max_length": args.n_ctx, "add_prefix_space": False}, indent=2) + "\n")
    (out / "train_log.json").write_text(json.dumps({
        "args": vars(args), "parameters": n_params, "steps": steps, "train_wall_seconds": wall,
        "train_tokens": int(len(train_ids)), "held_out": val, "samples": samples, "log": log,
        "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
