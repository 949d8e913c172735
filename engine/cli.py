"""The gpt2-onnx command line: thin wrappers that parse, call the public API, and print."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Fast GPT-2 inference with ONNX Runtime: export, generate, eval, bench, serve, info, cache.")
cache_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="List, clear or verify the export cache.")
app.add_typer(cache_app, name="cache")
err = Console(stderr=True, soft_wrap=True, highlight=False)

MODEL_HELP = "exported folder, Hugging Face folder or Hub id (default: the bundled Tiny Shakespeare model)"
# the API's parameter names, as the flags that set them
FLAGS = {"max_new_tokens": "--max-new-tokens", "top_k": "--top-k", "top_p": "--top-p", "temperature": "--temperature",
         "repetition_penalty": "--repetition-penalty", "seed": "--seed", "threads": "--threads",
         "provider": "--provider", "quantize": "--quantize", "dtype": "--dtype", "window": "--window",
         "n": "--samples", "stop": "--stop", "min_new_tokens": "--min-new-tokens", "min_p": "--min-p",
         "typical_p": "--typical-p", "presence_penalty": "--presence-penalty", "frequency_penalty": "--frequency-penalty",
         "logit_bias": "--logit-bias", "bad_words": "--bad-word", "bad_words_ids": "--bad-word",
         "no_repeat_ngram_size": "--no-repeat-ngram-size", "num_beams": "--num-beams", "length_penalty": "--length-penalty",
         "early_stopping": "--early-stopping", "best_of": "--best-of", "answer_regex": "--vote", "format": "--format",
         "num_return_sequences": "--samples", "json_schema": "--json-schema", "json_object": "--json-object",
         "regex": "--regex", "choice": "--choice", "grammar": "--grammar"}


def _read_text(flag: str, path: Optional[Path]) -> Optional[str]:
    """A flag's file as text (None without the flag); one line and exit 2 when it cannot be read."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        _fail(ValueError(f"cannot read {flag} {path}: {getattr(e, 'strerror', None) or e}"))


def _fail(e: Exception, flags: dict[str, str] = FLAGS) -> None:
    """One clear line on stderr and exit code 2; an InvalidInput names its option by the flag that sets it."""
    named = getattr(e, "named", None)  # gpt2_onnx.errors.InvalidInput
    msg = named(flags) if named is not None else str(e)
    err.print(f"[bold red]error:[/] {escape(msg)}")
    raise typer.Exit(2)


def _check_model(model: Optional[str]) -> None:
    """A mistyped local -m path is one line at once, before the server, Ray or the exporter is imported."""
    from gpt2_onnx.config import check_model_spec

    try:
        if model is not None:
            check_model_spec(model)
    except ValueError as e:
        _fail(e)


def _version(value: bool) -> None:
    if value:
        from gpt2_onnx import __version__

        print(f"gpt2-onnx {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                              help="print the version and exit")):
    """Fast GPT-2 inference with ONNX Runtime."""


def _load(model: Optional[str], provider: str, threads: Optional[int], *, dtype: str = "float32",
          quantize: Optional[str] = None):
    from gpt2_onnx import Engine

    said: list[str] = []  # progress comes only from an export into the cache: its first message says so

    def progress(message: str) -> None:
        said.append(message)
        status.update(escape(message))

    with err.status(f"preparing {escape(model or 'the bundled model')}") as status:
        engine = Engine.load(model, provider=provider, threads=threads, dtype=dtype, quantize=quantize,
                             progress=progress)
    if said:
        err.print(f"{escape(said[0])}: done")
    return engine


@app.command()
def export(model: str = typer.Argument(..., help="Hub id (gpt2, distilgpt2, ...) or local Hugging Face folder"),
           output: Path = typer.Option(..., "-o", "--output", help="folder to write"),
           dtype: str = typer.Option("float32", help="float32 | float16 (float16 is for CUDA)"),
           quantize: Optional[str] = typer.Option(None, help="int8 | int4 weight-only (MatMulNBits)"),
           adapter: Optional[Path] = typer.Option(None, "--adapter", help="adapter folder: PEFT LoRA/IA3 (merged) "
                                                                          "or an adapters-library bottleneck (graph nodes)"),
           lora_slots: int = typer.Option(0, "--lora-slots", help="LoRA adapters taken at run time (generate --lora, "
                                                                  "serve --lora), each row of a batch with its own"),
           max_lora_rank: Optional[int] = typer.Option(None, "--max-lora-rank",
                                                       help="the largest LoRA rank those slots take (default 16)"),
           format: str = typer.Option("gpt2-onnx", "--format",
                                      help="gpt2-onnx (this runtime) | genai (onnxruntime-genai: C#, Java, C/C++, "
                                           "Python; genai_config.json, float16 set for CUDA)")):
    """Export a GPT-2 checkpoint to model.onnx + kv_copy.onnx + embeds.onnx + manifest.json + tokenizer.json
    (--format genai: model.onnx + genai_config.json + tokenizer.json + tokenizer_config.json)."""
    from gpt2_onnx.resolve import export

    try:
        with err.status(f"exporting {escape(model)}") as status:
            out = export(model, output, dtype=dtype, quantize=quantize, adapter=adapter, lora_slots=lora_slots,
                         max_lora_rank=max_lora_rank, format=format, progress=lambda m: status.update(escape(m)))
    except ValueError as e:
        _fail(e)
    err.print(f"exported {escape(model)} -> {escape(str(out))}")


def _check_utf8(what: str, text: str) -> None:
    """Bytes in argv that are not UTF-8 reach Python as lone surrogates (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        _fail(ValueError(f"{what} is not valid UTF-8 text (at character {e.start}); pass UTF-8 text"))


def _print_sample(i: int, samples: int, head: str) -> None:
    if samples > 1:
        sys.stdout.write(f"{'' if i == 0 else chr(10)}--- sample {i} ---\n")
    sys.stdout.write(head)
    sys.stdout.flush()


def _logit_bias(pairs: Optional[list[str]]) -> Optional[dict[int, float]]:
    """--logit-bias ID=BIAS (repeatable) as {id: bias}."""
    out = {}
    for pair in pairs or []:
        tid, _, bias = pair.partition("=")
        try:
            out[int(tid)] = float(bias)
        except ValueError:
            _fail(ValueError(f"--logit-bias takes TOKEN_ID=BIAS (e.g. 198=-100), got {pair!r}"))
    return out or None


def _early_stopping(value: str) -> bool | str:
    v = value.lower()
    if v not in ("true", "false", "never"):
        _fail(ValueError(f"--early-stopping must be true, false or never, got {value!r}"))
    return v == "true" if v != "never" else v


@app.command()
def generate(prompt: str = typer.Argument(..., help="prompt text, or - to read it from stdin"),
             model: Optional[str] = typer.Option(None, "-m", "--model", help=MODEL_HELP),
             max_new_tokens: int = typer.Option(64, "-n", "--max-new-tokens", help="tokens to generate at most"),
             min_new_tokens: int = typer.Option(0, help="eos and stop ids are masked until this many tokens"),
             samples: int = typer.Option(1, "--samples", help="samples (or beam hypotheses) of the prompt; they "
                                                               "share one prefill"),
             stream: bool = typer.Option(False, "--stream/--no-stream", help="print tokens as they arrive"),
             echo: bool = typer.Option(True, "--echo/--no-echo", help="print the prompt before its continuation"),
             temperature: Optional[float] = typer.Option(None, help="0 = greedy (the default; 0.7 with --vote); "
                                                                    "> 0 samples"),
             top_k: int = typer.Option(0, help="sample from the k most likely tokens (0 = off)"),
             top_p: float = typer.Option(1.0, help="nucleus sampling mass (1 = off)"),
             min_p: float = typer.Option(0.0, help="drop tokens less likely than min_p x the top one (0 = off)"),
             typical_p: float = typer.Option(1.0, help="locally typical sampling mass (1 = off)"),
             repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeats (1 = off)"),
             presence_penalty: float = typer.Option(0.0, help="OpenAI's presence penalty, -2..2 (0 = off)"),
             frequency_penalty: float = typer.Option(0.0, help="OpenAI's frequency penalty, -2..2 (0 = off)"),
             logit_bias: Optional[list[str]] = typer.Option(None, help="TOKEN_ID=BIAS added to that token's logit, "
                                                                       "-100..100 (repeatable)"),
             bad_word: Optional[list[str]] = typer.Option(None, help="a word never to generate (repeatable)"),
             no_repeat_ngram_size: int = typer.Option(0, help="never repeat an n-gram of this size (0 = off)"),
             num_beams: int = typer.Option(1, help="beam search with this many beams (1 = off)"),
             length_penalty: float = typer.Option(1.0, help="beam search: score = sum log p / length ** this"),
             early_stopping: str = typer.Option("false", help="beam search: true, false or never"),
             best_of: Optional[int] = typer.Option(None, help="sample this many, keep the --samples most likely"),
             vote: Optional[str] = typer.Option(None, help="self-consistency: majority answer of the --samples, "
                                                           "each one's last match of this regex (its first group if "
                                                           "any); 'number' = the last number"),
             seed: Optional[int] = typer.Option(None, help="seed for reproducible sampling"),
             stop: Optional[list[str]] = typer.Option(None, help="stop string (repeatable); not printed"),
             json_schema: Optional[Path] = typer.Option(None, help="structured output: a JSON Schema file the "
                                                                   "output follows (compact JSON)"),
             json_object: bool = typer.Option(False, "--json-object", help="structured output: any JSON object"),
             regex: Optional[str] = typer.Option(None, help="structured output: the whole output matches this regex"),
             choice: Optional[list[str]] = typer.Option(None, help="structured output: one of these strings "
                                                                   "(repeatable)"),
             grammar: Optional[Path] = typer.Option(None, help="structured output: a grammar file (llguidance's "
                                                               "Lark syntax, or GBNF)"),
             provider: str = typer.Option("auto", help="auto | cpu | cuda"),
             threads: Optional[int] = typer.Option(None, help="CPU threads (default: onnxruntime's)"),
             prefix_adapter: Optional[Path] = typer.Option(None, help="a peft prefix-tuning, prompt-tuning or "
                                                         "P-tuning adapter to generate after"),
             lora: Optional[Path] = typer.Option(None, "--lora", help="a peft LoRA adapter to generate with (an export "
                                                                      "with --lora-slots)"),
             stats: bool = typer.Option(False, "--stats", help="print tokens, finish reason and timing to stderr")):
    """Generate a continuation of PROMPT (with the bundled Tiny Shakespeare model by default).

    Each sample is printed as the prompt (unless --no-echo) and its continuation; several samples are
    labelled and shown one after another, also with --stream (the first live, the others as they finish).
    Beam search and best_of print their answers when they end; --vote prints the samples, then the
    majority answer and the counts.
    """
    from gpt2_onnx import GenerationResult

    if prompt == "-":
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            _fail(ValueError(f"the prompt on stdin is not valid UTF-8 text ({e.reason} at byte {e.start})"))
        prompt = prompt.replace("\r\n", "\n").replace("\r", "\n")  # newlines as text-mode stdin reads them
    _check_utf8("PROMPT", prompt)
    for flag, texts in (("--stop", stop), ("--bad-word", bad_word), ("--regex", [regex] if regex else []),
                        ("--choice", choice)):
        for s in texts or []:
            _check_utf8(flag, s)
    constraint = dict(json_schema=_read_text("--json-schema", json_schema), json_object=json_object, regex=regex,
                      choice=choice or None, grammar=_read_text("--grammar", grammar))
    options = dict(**{k: v for k, v in constraint.items() if v not in (None, False)},
                   max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, top_k=top_k, top_p=top_p,
                   min_p=min_p, typical_p=typical_p, repetition_penalty=repetition_penalty,
                   presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                   logit_bias=_logit_bias(logit_bias), bad_words=tuple(bad_word or ()),
                   no_repeat_ngram_size=no_repeat_ngram_size, num_beams=num_beams, length_penalty=length_penalty,
                   early_stopping=_early_stopping(early_stopping), best_of=best_of, seed=seed, stop=stop or None)
    if temperature is not None or vote is None:
        options["temperature"] = 0.0 if temperature is None else temperature
    head = prompt if echo else ""
    steps: dict[int, list] = {i: [] for i in range(samples)}
    printed = [-1] * samples  # steps of each sample printed so far (-1: not even its header)
    shown = 0  # the sample printed live; later ones are held until it is complete

    def show() -> None:
        nonlocal shown
        while shown < samples:
            if printed[shown] < 0:
                _print_sample(shown, samples, head)
                printed[shown] = 0
            ss = steps[shown]
            sys.stdout.write("".join(s.text for s in ss[printed[shown]:]))
            sys.stdout.flush()
            printed[shown] = len(ss)
            if not ss or not ss[-1].finish_reason:
                return
            sys.stdout.write("\n")
            shown += 1

    ballot = None
    try:
        engine = _load(model, provider, threads)
        prefix = engine.load_prefix(prefix_adapter) if prefix_adapter is not None else None
        adapter = engine.load_lora(lora) if lora is not None else None
        if vote is not None:
            ballot = engine.vote(prompt, n=samples, answer_regex=None if vote == "number" else vote, prefix=prefix,
                                 adapter=adapter, **options)
            results = ballot.samples
        elif num_beams > 1 or (best_of or samples) > samples:  # answers known only at the end
            results = engine.generate_batch([prompt], n=samples, prefix=prefix, adapter=adapter, **options)
        else:
            for step in engine.stream_batch([prompt], n=samples, prefix=prefix, adapter=adapter, **options):
                steps[step.row].append(step)
                if stream:
                    show()
            results = [GenerationResult.from_steps(steps[i], 0) for i in range(samples)]
    except ValueError as e:
        _fail(e)
    for i, r in enumerate(results):
        if not stream or ballot is not None or not steps[i]:
            _print_sample(i, samples, head)
            print(r.text)
            if ballot is not None:
                print(f"[answer: {ballot.answers[i]}]")
        if stats:
            score = "" if r.score is None else f", score {r.score:.4f}"
            err.print(f"sample {i}: {len(r.token_ids)} tokens, finish={r.finish_reason}{score}, "
                      f"ttft {r.time_to_first_token * 1e3:.1f} ms, {r.decode_tokens_per_s:.1f} tok/s ({engine.provider})")
    if ballot is not None:
        counts = ", ".join(f"{a} x{c}" for a, c in ballot.counts.items()) or "none"
        print(f"\nanswer: {ballot.answer} ({ballot.counts.get(ballot.answer, 0)} of {samples} samples; {counts})")


@app.command()
def info(model: Optional[str] = typer.Argument(None, help=MODEL_HELP)):
    """Show a model's manifest and graph inputs/outputs."""
    try:
        eng = _load(model, "cpu", None)
    except ValueError as e:
        _fail(e)
    print(f"{'folder':22} {eng.folder}")
    for k, v in eng.config.__dict__.items():
        print(f"{k:22} {v}")
    for i in eng.model.session.get_inputs():
        print(f"input  {i.name:28} {i.type:22} {i.shape}")
    for o in eng.model.session.get_outputs():
        print(f"output {o.name:28} {o.type:22} {o.shape}")


@app.command("eval")
def eval_(file: Path = typer.Argument(..., help="UTF-8 text file"),
          model: Optional[str] = typer.Option(None, "-m", "--model", help=MODEL_HELP),
          window: Optional[int] = typer.Option(None, help="tokens per window (default: n_positions)"),
          provider: str = typer.Option("auto", help="auto | cpu | cuda"),
          threads: Optional[int] = typer.Option(None, help="CPU threads (default: onnxruntime's)")):
    """Held-out loss (nats/token, nats/char) and perplexity of a model on FILE."""
    from rich.progress import Progress

    from gpt2_onnx.evaluate import evaluate

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
def bench(model: Optional[str] = typer.Option(None, "-m", "--model", help=MODEL_HELP),
          prompt_tokens: int = typer.Option(32, "--prompt", help="prompt length in tokens (random ids)"),
          new_tokens: int = typer.Option(64, "--new", help="tokens generated per run (eos ignored)"),
          batch: int = typer.Option(1, help="sequences generated together"),
          runs: int = typer.Option(5, help="timed runs after one warm-up; medians are reported"),
          dtype: str = typer.Option("float32", help="float32 | float16 (float16 is for CUDA)"),
          quantize: Optional[str] = typer.Option(None, help="int8 | int4 weight-only"),
          provider: str = typer.Option("auto", help="auto | cpu | cuda"),
          threads: Optional[int] = typer.Option(None, help="CPU threads (default: onnxruntime's)"),
          as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table")):
    """Time greedy generation of one model (python -m benchmarks compares it with other runtimes)."""
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
        _fail(e, {**FLAGS, "max_new_tokens": "--new"})
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
def serve(ctx: typer.Context, model: Optional[str] = typer.Option(None, "-m", "--model", help=MODEL_HELP),
          host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default)"),
          port: int = typer.Option(8000, help="TCP port"),
          api_key: Optional[str] = typer.Option(None, envvar="GPT2_ONNX_API_KEY",
                                                help="require Authorization: Bearer KEY on /v1/*, /tokenize, /detokenize, "
                                                     "/tokenizer_info (printable ASCII)"),
          served_model_name: Optional[str] = typer.Option(None, help="model id clients send (default: the "
                                                                     "model's name, e.g. tiny-shakespeare or gpt2)"),
          max_batch: Optional[int] = typer.Option(None, help="sequences decoded together (KV rows) [default: 64 on "
                                                             "the CPU, 16 on CUDA]"),
          max_queue: int = typer.Option(256, help="waiting sequences before 429"),
          prefix_cache_mb: float = typer.Option(512, help="memory for the automatic prefix cache (0 = off)"),
          prefix_adapter: Optional[list[str]] = typer.Option(None, help="NAME=DIR: a peft prefix-tuning, "
                                                             "prompt-tuning or P-tuning adapter served as model NAME "
                                                             "(repeatable)"),
          lora: Optional[list[str]] = typer.Option(None, "--lora", help="NAME=DIR: a peft LoRA adapter served as model "
                                                                       "NAME (repeatable; an export with --lora-slots)"),
          max_connections: int = typer.Option(512, help="open connections; one more gets a JSON 503 with Retry-After"),
          header_timeout: float = typer.Option(10.0, help="seconds a request's line and headers may take from their "
                                                          "first byte (a new connection: from the connect); then a JSON "
                                                          "408"),
          idle_timeout: float = typer.Option(15.0, help="seconds a connection may stay silent between requests "
                                                        "(keep-alive) or within a request's body"),
          max_header_bytes: int = typer.Option(32768, help="bytes of a request's line and headers (beyond: a JSON "
                                                           "431)"),
          metrics_auth: bool = typer.Option(False, "--metrics-auth/--no-metrics-auth",
                                            help="with --api-key, /metrics, /docs and /openapi.json need the key too"),
          chat_template: Optional[str] = typer.Option(None, help="FILE or Jinja text: the chat template of "
                                                                 "/v1/chat/completions (default: the model's)"),
          grace_period: float = typer.Option(10.0, help="seconds in-flight requests may finish after SIGTERM"),
          read_timeout: float = typer.Option(60.0, help="seconds a stream may stay unread (its KV rows held) before "
                                                        "it ends with an error event (0 = never)"),
          provider: str = typer.Option("auto", help="auto | cpu | cuda"),
          threads: Optional[int] = typer.Option(None, help="CPU threads (default: onnxruntime's; on Ray: 1 per "
                                                           "replica)"),
          # ---- scale out on Ray Serve (the ray extra): see _serve_on_ray ----
          replicas: Optional[int] = typer.Option(None, help="serve on Ray Serve with N replicas, one engine each"),
          ray_address: Optional[str] = typer.Option(None, help="Ray cluster to deploy on (default: start a local "
                                                               "Ray instance)"),
          min_replicas: Optional[int] = typer.Option(None, help="autoscaling: fewest replicas"),
          max_replicas: Optional[int] = typer.Option(None, help="autoscaling: most replicas"),
          target_ongoing_requests: Optional[float] = typer.Option(None, help="autoscaling: requests per replica "
                                                                             "to aim for (default: max-batch / 2)"),
          config: Optional[Path] = typer.Option(None, help="YAML/JSON file of Ray serving options (the names of "
                                                           "these flags with underscores); flags override it")):
    """Serve an OpenAI-compatible /v1/completions and /v1/chat/completions API with continuous batching (on Ray
    Serve with --replicas)."""
    if api_key is None and os.environ.get("GPT2_ONNX_API_KEY") == "":  # click reads an empty variable as unset
        _fail(ValueError("GPT2_ONNX_API_KEY is set but empty; set it to the key clients must send, or unset it "
                         "to serve without authentication"))
    from gpt2_onnx.server.options import ServeOptions

    given = {k: v for k, v in ctx.params.items() if k != "config"
             and getattr(ctx.get_parameter_source(k), "name", "") in ("COMMANDLINE", "ENVIRONMENT")}
    try:
        if "prefix_adapter" in given:
            given["prefix_adapters"] = _adapter_specs(given.pop("prefix_adapter"))
        if "lora" in given:
            given["lora_adapters"] = _adapter_specs(given.pop("lora"), "--lora")
        options = ServeOptions.resolve(config, given)  # defaults < --config file < flags
    except ValueError as e:
        _serve_fail(e)
    _check_model(options.model)
    if config is not None or given.keys() & {"replicas", "ray_address", "min_replicas", "max_replicas",
                                              "target_ongoing_requests"}:
        _need_ray("serve --replicas")
        from gpt2_onnx.distributed import serve_forever

        try:
            return serve_forever(options, address=options.ray_address, host=options.host, port=options.port,
                                 on_ready=lambda m: err.print(escape(m)))
        except ValueError as e:
            _serve_fail(e)
    try:
        from gpt2_onnx.server import create_app, serve as run_server
    except ImportError as e:
        _fail(ValueError(f"the server needs the serve extra ({e.name} is missing): pip install 'gpt2-onnx[serve]'"))
    try:
        app_ = create_app(options.served(_load(options.model, options.provider, options.threads)),
                          api_key=options.api_key, metrics_auth=options.metrics_auth)
    except ValueError as e:
        _serve_fail(e)
    err.print(f"serving {escape(app_.state.model_id)} on http://{options.host}:{options.port}/v1")
    run_server(app_, host=options.host, port=options.port, grace=options.grace_period, **options.connection_limits())


def _adapter_specs(specs: list[str] | None, flag: str = "--prefix-adapter") -> dict[str, str]:
    """--prefix-adapter (or --lora) NAME=DIR values as {NAME: DIR}."""
    out = {}
    for spec in specs or []:
        name, sep, folder = spec.partition("=")
        if not (sep and name and folder):
            raise ValueError(f"{flag} takes NAME=DIR, got {spec!r}")
        out[name] = folder
    return out


# the serving and batch options' names, as the flags that set them
SERVE_FLAGS = {**FLAGS, "model": "-m/--model", "served_model_name": "--served-model-name", "api_key": "--api-key",
               "max_batch": "--max-batch", "max_queue": "--max-queue", "prefix_cache_mb": "--prefix-cache-mb",
               "prefix_adapters": "--prefix-adapter", "lora_adapters": "--lora", "chat_template": "--chat-template",
               "max_connections": "--max-connections", "header_timeout": "--header-timeout",
               "idle_timeout": "--idle-timeout", "max_header_bytes": "--max-header-bytes",
               "metrics_auth": "--metrics-auth", "grace_period": "--grace-period", "host": "--host",
               "read_timeout": "--read-timeout",
               "port": "--port", "replicas": "--replicas", "min_replicas": "--min-replicas",
               "max_replicas": "--max-replicas", "target_ongoing_requests": "--target-ongoing-requests",
               "ray_address": "--ray-address", "batch_size": "--batch-size"}


def _serve_fail(e: Exception) -> None:
    _fail(e, SERVE_FLAGS)


def _need_ray(what: str) -> None:
    try:
        import ray  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError:
        _fail(ValueError(f"{what} needs Ray: pip install 'gpt2-onnx[ray]'"))


@app.command()
def batch(input: Path = typer.Argument(..., help="JSONL: one {\"id\": ..., \"prompt\": ..., ...} (completion fields) "
                                                 "or {\"id\": ..., \"context\": ..., \"continuation\": ...} per line; or "
                                                 "an OpenAI Batch file (custom_id, method, url, body)"),
          output: Path = typer.Option(..., "-o", "--output", help="JSONL to append {\"id\", \"status\", \"body\"} rows to; "
                                                                 "a rerun skips the ids already there"),
          model: Optional[str] = typer.Option(None, "-m", "--model", help=MODEL_HELP),
          replicas: Optional[int] = typer.Option(None, help="run on Ray Data with N actors, one engine each (the ray "
                                                            "extra); default: in this process, without Ray"),
          ray_address: Optional[str] = typer.Option(None, help="Ray cluster for --replicas (default: start a local "
                                                               "Ray instance)"),
          batch_size: int = typer.Option(64, help="rows per batch (written and flushed together)"),
          max_batch: Optional[int] = typer.Option(None, help="sequences decoded together per engine (KV rows) "
                                                             "[default: 64 on the CPU, 16 on CUDA]"),
          prefix_cache_mb: float = typer.Option(512, help="memory for the automatic prefix cache (0 = off)"),
          lora: Optional[list[str]] = typer.Option(None, "--lora", help="NAME=DIR: a peft LoRA adapter rows choose by "
                                                                       "\"model\": NAME (repeatable; an export with "
                                                                       "--lora-slots)"),
          provider: str = typer.Option("auto", help="auto | cpu | cuda"),
          threads: Optional[int] = typer.Option(None, help="CPU threads per engine (default: onnxruntime's; with "
                                                           "--replicas: 1)")):
    """Generate (and score) every row of INPUT into OUTPUT, resumably: every row appears exactly once.

    Ctrl-C ends it with exit code 130, keeping the rows written (a rerun answers the rest)."""
    todo = None
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        _check_model(model)
        try:
            from gpt2_onnx import batch as job
        except ImportError as e:
            _fail(ValueError(f"batch needs the serve extra ({e.name} is missing): pip install 'gpt2-onnx[serve]'"))
        if replicas is not None:
            _need_ray("batch --replicas")
        options = dict(batch_size=batch_size, max_batch=max_batch, replicas=replicas, ray_address=ray_address)
        try:
            loras = _adapter_specs(lora, "--lora")
            todo = job.prepare(input, output, **options)
        except ValueError as e:
            _serve_fail(e)
        note = ", cut a torn last line" if todo.dropped_torn_line else ""
        err.print(f"{todo.total} rows in {escape(str(input))}: {len(todo.done)} already in {escape(str(output))}"
                  f"{note}, {len(todo.pending)} to do")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        try:
            with Progress(*columns, console=err) as bar:
                task = bar.add_task("answering", total=len(todo.pending))
                out = job.execute(todo, output, model=model, provider=provider, threads=threads,
                                  prefix_cache_mb=prefix_cache_mb, progress=lambda k, n: bar.update(task, completed=k),
                                  loras=loras, **options)
        except ValueError as e:
            _serve_fail(e)
    except KeyboardInterrupt:  # Ctrl-C: what was written stays (flushed and fsynced); a rerun answers the rest
        # straight to the process's stderr: the interrupt may have left rich's console (or its Live redirection of
        # sys.stderr) mid-way
        sys.__stderr__.write(_interrupted(output, todo) + "\n")
        sys.__stderr__.flush()
        raise typer.Exit(130) from None
    err.print(f"wrote {out.written} rows ({out.errors} with an error status) to {escape(str(output))}")


def _interrupted(output: Path, todo) -> str:
    """What an interrupted batch job leaves: the rows OUTPUT holds (whole lines: each batch is written at once)."""
    if todo is None:
        return f"interrupted before any row was answered; {output} is unchanged"
    held = None
    try:
        if output.is_file():  # never a pipe or a device: reading one would wait or never end
            with open(output, "rb") as f:
                held = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        pass
    if held is None:
        return f"interrupted: the rows written to {output} are kept; run the same command again to answer the rest"
    return (f"interrupted: {output} holds {held} of the {todo.total} rows (flushed and fsynced); run the same command "
            f"again to answer the other {todo.total - held}")


@cache_app.command("list")
def cache_list():
    """Exports in the cache (GPT2_ONNX_CACHE): name, size, source; incomplete ones say so."""
    from gpt2_onnx.config import cache_root
    from gpt2_onnx.resolve import cache_entries

    try:
        entries = cache_entries()
    except ValueError as e:
        _fail(e)
    print(f"{cache_root()}: {len(entries)} export(s), {sum(e['bytes'] for e in entries) / 1e6:.1f} MB")
    for e in entries:
        if e["problem"]:
            print(f"{e['name']:48} {e['bytes'] / 1e6:9.1f} MB  {e['problem']}; remove it: gpt2-onnx cache clear "
                  f"{e['name']}")
            continue
        q = f" {e['quantization']}" if e["quantization"] else ""
        print(f"{e['name']:48} {e['bytes'] / 1e6:9.1f} MB  {e['dtype']}{q}  {e['source']}")


@cache_app.command("clear")
def cache_clear(name: Optional[str] = typer.Argument(None, help="one export (see cache list); default: all")):
    """Delete exports from the cache, incomplete ones included (they are made again when next needed)."""
    from gpt2_onnx.resolve import clear_cache

    try:
        gone = clear_cache(name)
    except ValueError as e:
        _fail(e)
    print(f"deleted {len(gone)} export(s)" + "".join(f"\n  {g}" for g in gone))


@cache_app.command("verify")
def cache_verify(name: Optional[str] = typer.Argument(None, help="one export (see cache list); default: all")):
    """Check that each export's weights match the digest its manifest recorded at export (exit 2 if not)."""
    from gpt2_onnx.resolve import verify_cache

    try:
        results = verify_cache(name)
    except ValueError as e:
        _fail(e)
    bad = 0
    for entry, problem in results:
        if problem is None:
            print(f"{entry}: ok")
        else:
            bad += 1
            err.print(f"[bold red]error:[/] {escape(entry)}: {escape(problem)}; remove it with `gpt2-onnx cache clear "
                      f"{escape(entry)}` (it is exported again when next needed)")
    if not results:
        from gpt2_onnx.config import cache_root

        print(f"{cache_root()}: no exports")
    if bad:
        raise typer.Exit(2)


def _closed_pipe() -> None:
    """stdout's reader went away (`gpt2-onnx generate ... | head -2`): end quietly with exit code 0, as `yes | head`
    does. stdout now writes to /dev/null, so the interpreter's last flush of what is still buffered is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):
        pass
    raise SystemExit(0)


def main() -> None:  # console-script entry point
    try:
        app()
    except BrokenPipeError:
        _closed_pipe()
    except OSError as e:  # a failure no command foresaw (a full disk, an I/O error): one line, never a traceback
        where = f" ({e.filename})" if e.filename else ""
        err.print(f"[bold red]error:[/] {escape(e.strerror or str(e))}{escape(where)}")
        raise SystemExit(2) from None
    except SystemExit as e:  # click turns EPIPE into exit code 1, raised while handling the BrokenPipeError
        if e.code == 1 and isinstance(e.__context__, BrokenPipeError):
            _closed_pipe()
        raise


if __name__ == "__main__":
    main()
