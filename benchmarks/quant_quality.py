"""Quantization quality on the bundled Tiny Shakespeare model: held-out loss and top-1 agreement.

    python -m benchmarks.quant_quality --file tinyshakespeare.txt

Evaluates the last 10% of FILE (the split the model never trained on) with `gpt2-onnx eval`'s
computation for fp32, int8 and int4 exports.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import add_out, exported_bytes, machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", required=True, help="the full corpus; its last 10%% is evaluated")
    ap.add_argument("--threads", type=int, default=2)
    add_out(ap)
    args = ap.parse_args()
    from gpt2_onnx import Engine
    from gpt2_onnx.evaluate import evaluate
    from gpt2_onnx.export import export_model
    from gpt2_onnx.models import BUNDLED

    text = Path(args.file).read_text(encoding="utf-8")
    held = text[int(len(text) * 0.9):]
    rows, top1 = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for q in (None, "int8", "int4"):
            name = q or "fp32"
            out = export_model(str(BUNDLED), Path(tmp) / name, quantize=q)
            res = evaluate(Engine.load(out, provider="cpu", threads=args.threads), held)
            rows[name] = {"nats_per_token": res.nats_per_token, "nats_per_char": res.nats_per_char,
                          "perplexity": res.perplexity, "tokens": res.tokens, "chars": res.chars,
                          "model_bytes": exported_bytes(out)}
            top1[name] = res.top1
    ref = rows["fp32"]
    for name, r in rows.items():
        r["loss_increase_pct"] = 100 * (r["nats_per_token"] / ref["nats_per_token"] - 1)
        r["top1_agreement_with_fp32"] = float(np.mean(top1[name] == top1["fp32"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_quality.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    lines = [f"`python -m benchmarks.quant_quality --file {args.file}`: bundled model, held-out last 10% "
             f"({ref['chars']} chars, {ref['tokens']} tokens)", "",
             "| export | nats/token | nats/char | perplexity | loss increase | top-1 agreement with fp32 | model MB (graph + weights) |",
             "|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['nats_per_token']:.4f} | {r['nats_per_char']:.4f} | {r['perplexity']:.2f} | "
                     f"{r['loss_increase_pct']:+.2f}% | {r['top1_agreement_with_fp32']:.4f} | {r['model_bytes'] / 1e6:.1f} |")
    (args.out / "quant_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
