"""The gpt2-onnx command line: thin wrappers that parse, call the public API, and print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fast GPT-2 inference with ONNX Runtime: export, generate, eval, bench, serve, info.")
err = Console(stderr=True, soft_wrap=True)


def _fail(e: Exception) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False)
    raise typer.Exit(2)


def _load(model: Optional[str], provider: str, threads: Optional[int], *, dtype: str = "float32",
          quantize: Optional[str] = None):
    from engine import Engine
    from export.cache import resolve_model
    from models import DEFAULT_MODEL

    spec = model or DEFAULT_MODEL
    with err.status(f"preparing {spec}") as status:
        folder = resolve_model(spec, dtype=dtype, quantize=quantize, progress=lambda m: status.update(m))
    return Engine.load(folder, provider=provider, threads=threads)


@app.command()
def export(model: str = typer.Argument(..., help="Hub id (gpt2, distilgpt2, ...) or local HF checkpoint folder"),
           output: Path = typer.Option(..., "-o", "--output", help="folder to write"),
           dtype: str = typer.Option("float32", help="float32 | float16 (float16 is for CUDA)"),
           quantize: Optional[str] = typer.Option(None, help="int8 | int4 weight-only (MatMulNBits)"),
           adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT adapter folder (LoRA, IA3) to merge")):
    """Export a GPT-2 checkpoint to model.onnx + manifest.json + tokenizer.json."""
    from export import export_model

    try:
        with err.status(f"exporting {model}") as status:
            out = export_model(model, output, dtype=dtype, quantize=quantize, adapter=adapter,
                               progress=lambda m: status.update(m))
    except ValueError as e:
        _fail(e)
    err.print(f"exported {model} -> {out}")


@app.command()
def generate(prompt: str = typer.Argument(..., help="prompt text, or - to read it from stdin"),
             model: Optional[str] = typer.Option(None, "-m", "--model",
                                                 help="exported folder, HF folder or Hub id [default: bundled]"),
             max_new_tokens: int = typer.Option(64, "-n", "--max-new-tokens", help="tokens to generate at most"),
             stream: bool = typer.Option(False, "--stream", help="print tokens as they arrive"),
             temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples"),
             top_k: int = typer.Option(0, help="sample from the k most likely tokens (0 = off)"),
             top_p: float = typer.Option(1.0, help="nucleus sampling mass (1 = off)"),
             repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeats (1 = off)"),
             seed: Optional[int] = typer.Option(None, help="seed for reproducible sampling"),
             stop: Optional[list[str]] = typer.Option(None, help="stop string (repeatable); not printed"),
             samples: int = typer.Option(1, "--n", help="number of samples for the prompt"),
             provider: str = typer.Option("auto", help="auto | cpu | cuda"),
             threads: Optional[int] = typer.Option(None, help="CPU threads (default: onnxruntime's)"),
             stats: bool = typer.Option(False, "--stats", help="print timing to stderr")):
    """Generate a continuation of PROMPT (with the bundled Tiny Shakespeare model by default)."""
    if prompt == "-":
        prompt = sys.stdin.read()
    opts = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=repetition_penalty, seed=seed, stop=stop or None, n=samples)
    try:
        engine = _load(model, provider, threads)
        if stream:
            for step in engine.stream_batch([prompt], **opts):
                if samples > 1 and step.index == 0:
                    sys.stdout.write(f"\n--- sample {step.row} ---\n")
                sys.stdout.write(step.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return
        results = engine.generate_batch([prompt], **opts)
    except ValueError as e:
        _fail(e)
    for i, r in enumerate(results):
        if samples > 1:
            print(f"--- sample {i} ---")
        print(prompt + r.text if samples == 1 else r.text)
        if stats:
            err.print(f"{len(r.token_ids)} tokens, finish={r.finish_reason}, ttft {r.time_to_first_token*1e3:.1f} ms, "
                      f"{r.decode_tokens_per_s:.1f} tok/s ({engine.provider})")


@app.command()
def info(folder: Path = typer.Argument(..., help="exported folder")):
    """Show an exported model's manifest and graph inputs/outputs."""
    from engine import Engine

    try:
        eng = Engine.load(folder, provider="cpu")
    except ValueError as e:
        _fail(e)
    for k, v in eng.config.__dict__.items():
        print(f"{k:22} {v}")
    for i in eng.model.session.get_inputs():
        print(f"input  {i.name:28} {i.type:22} {i.shape}")
    for o in eng.model.session.get_outputs():
        print(f"output {o.name:28} {o.type:22} {o.shape}")


@app.command("eval")
def eval_(model: str = typer.Argument(..., help="exported folder, HF folder or Hub id"),
          file: Path = typer.Argument(..., help="UTF-8 text file"),
          window: Optional[int] = typer.Option(None, help="tokens per window [default: n_positions]"),
          provider: str = typer.Option("auto", help="auto | cpu | cuda"),
          threads: Optional[int] = typer.Option(None)):
    """Held-out loss (nats/token, nats/char) and perplexity of MODEL on FILE."""
    from rich.progress import Progress

    from engine.evaluate import evaluate

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        _fail(ValueError(f"cannot read {file} as UTF-8 text: {e}"))
    try:
        engine = _load(model, provider, threads)
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("evaluating", total=None)
            res = evaluate(engine, text, window=window, progress=lambda k, n: bar.update(task, completed=k, total=n))
    except ValueError as e:
        _fail(e)
    print(f"tokens          {res.tokens}\nchars           {res.chars}\nchars/token     {res.chars / res.tokens:.4f}")
    print(f"nats/token      {res.nats_per_token:.4f}\nnats/char       {res.nats_per_char:.4f}")
    print(f"perplexity      {res.perplexity:.3f}")


@app.command()
def bench(model: Optional[str] = typer.Option(None, "-m", "--model",
                                            help="exported folder, HF folder or Hub id [default: bundled]"),
          prompt_tokens: int = typer.Option(32, "--prompt", help="prompt length in tokens (random ids)"),
          new_tokens: int = typer.Option(64, "--new", help="tokens generated per run (eos ignored)"),
          batch: int = typer.Option(1, help="sequences generated together"),
          runs: int = typer.Option(5, help="timed runs after one warm-up; medians are reported"),
          dtype: str = typer.Option("float32", help="float32 | float16 (float16 is for CUDA)"),
          quantize: Optional[str] = typer.Option(None, help="int8 | int4 weight-only"),
          provider: str = typer.Option("auto", help="auto | cpu | cuda"),
          threads: Optional[int] = typer.Option(None, help="CPU threads"),
          as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table")):
    """Time greedy generation of MODEL alone (python -m benchmarks compares it with other runtimes)."""
    import json
    import statistics
    import time

    import numpy as np

    for name, value in (("--prompt", prompt_tokens), ("--new", new_tokens), ("--batch", batch), ("--runs", runs)):
        if value < 1:
            _fail(ValueError(f"{name} must be >= 1, got {value}"))
    try:
        engine = _load(model, provider, threads, dtype=dtype, quantize=quantize)
        ids = np.random.default_rng(0).integers(0, engine.config.vocab_size, (batch, prompt_tokens)).tolist()
        walls, ttfts, rates = [], [], []
        for i in range(runs + 1):  # run 0 warms up
            t = time.perf_counter()
            rows = engine.generate_batch(ids, max_new_tokens=new_tokens, ignore_eos=True)
            if i:
                walls.append(time.perf_counter() - t)
                ttfts.append(rows[0].time_to_first_token)
                rates.append(sum(r.decode_tokens_per_s for r in rows))
    except ValueError as e:
        _fail(e)
    res = {"model": model or "bundled", "provider": engine.provider, "batch": batch, "prompt_tokens": prompt_tokens,
           "new_tokens": new_tokens, "runs": runs, "ttft_ms": 1e3 * statistics.median(ttfts),
           "decode_tok_s": statistics.median(rates), "end_to_end_tok_s": batch * new_tokens / statistics.median(walls)}
    if as_json:
        print(json.dumps(res))
        return
    print(f"{res['model']} on {res['provider']}: batch {batch}, prompt {prompt_tokens} + {new_tokens} new, "
          f"medians of {runs} runs")
    print(f"time to first token   {res['ttft_ms']:.1f} ms")
    print(f"decode                {res['decode_tok_s']:.1f} tok/s")
    print(f"end to end            {res['end_to_end_tok_s']:.1f} tok/s")


@app.command()
def serve(model: Optional[str] = typer.Option(None, "-m", "--model", help="exported folder, HF folder or Hub id "
                                              "[default: bundled]"),
          host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default)"),
          port: int = typer.Option(8000, help="TCP port"),
          api_key: Optional[str] = typer.Option(None, envvar="GPT2_ONNX_API_KEY",
                                                help="require Authorization: Bearer KEY on /v1/*"),
          max_batch: int = typer.Option(16, help="sequences decoded together (KV slots)"),
          max_queue: int = typer.Option(256, help="waiting requests before 429"),
          provider: str = typer.Option("auto", help="auto | cpu | cuda"),
          threads: Optional[int] = typer.Option(None, help="CPU threads")):
    """Serve an OpenAI-compatible /v1/completions API with continuous batching."""
    try:
        from engine.server import serve as run_server
    except ImportError as e:
        _fail(ValueError(f"the server needs the serve extra ({e.name} is missing): pip install 'gpt2-onnx[serve]'"))
    try:
        engine = _load(model, provider, threads)
    except ValueError as e:
        _fail(e)
    run_server(engine, host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
