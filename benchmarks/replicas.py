"""Throughput through the Ray Serve ingress: 1 replica x 2 threads vs 2 replicas x 1 thread, same run.

    python -m benchmarks.replicas [--models 124m,bundled] [--requests 64] [--requests-bundled 512]
                                  [--clients 32] [--max-tokens 64] [--rounds 2] [--name replicas]

One local Ray instance (2 CPUs, loopback) for the whole run; each configuration is the application
`gpt2-onnx serve --replicas N` deploys (gpt2_onnx.distributed.build), reached over HTTP through Ray's
proxy and the ingress on 127.0.0.1. The same total KV rows in every configuration (32: one replica of
--max-batch 32, or two of 16), the same prompts (32 random token ids each, distinct per request),
greedy; `clients` concurrent clients (one pooled HTTP client) share the requests. Also, with no
Ray in the path, the single-process server (`gpt2-onnx serve --threads 2 --max-batch 32`, in its own
process) on the same load; and the routing cost: the median latency of 40 one-token requests sent one
after another, direct vs through the ingress, and the CPU time Ray's proxy and the ingress used per
request during the throughput load (their idle use, measured for 3 s before it, subtracted). Every configuration's answers must equal the single
process's. Each round measures every configuration (the order reversed every other round).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import add_out, checkpoint, machine, write_results
from benchmarks.server_load import Served, free_port, load

HERE = Path(__file__).resolve().parents[1]
CONFIGS = {  # name: (replicas, threads per replica, KV rows per replica)
    "ray 1 replica x 2 threads": (1, 2, 32),
    "ray 2 replicas x 1 thread": (2, 1, 16),
}


def wait_health(url: str, replicas: int, proc: subprocess.Popen | None = None, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            h = httpx.get(url + "/health", timeout=5).json()
            if h.get("status") == "ok" and len(h.get("replicas", [None])) >= replicas:
                return
        except (httpx.HTTPError, ValueError):
            pass
        if time.time() > deadline or (proc is not None and proc.poll() is not None):
            raise SystemExit(f"{url} did not become healthy")
        time.sleep(0.3)


def latency(url: str, vocab: int) -> float:
    """Median ms of 40 one-token requests (8-token prompts) one after another, after 5 warm-ups."""
    rng = np.random.default_rng(7)
    with httpx.Client(timeout=60) as client:
        times = []
        for i in range(45):
            t = time.perf_counter()
            client.post(url + "/v1/completions", json={"prompt": rng.integers(0, vocab - 1, 8).tolist(),
                                                       "max_tokens": 1, "temperature": 0}).raise_for_status()
            if i >= 5:
                times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def ray_processes() -> dict[str, list]:
    """This run's Ray proxy and ingress processes (descendants of this process only)."""
    import psutil

    out = {"proxy": [], "ingress": []}
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::ProxyActor"):
            out["proxy"].append(p)
        elif title.startswith("ray::ServeReplica:gpt2-onnx:Ingress"):
            out["ingress"].append(p)
    return out


def cpu_seconds(procs: list) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:
            pass
    return total


def single(model: str, jobs, args, vocab: int) -> dict:
    srv = Served(HERE, model, threads=2, max_batch=32, extra=["--provider", "cpu"])
    try:
        load(srv.url, 8, jobs[:8], args.max_tokens)  # warm-up
        out = load(srv.url, args.clients, jobs, args.max_tokens)
        out["latency_1_token_ms"] = latency(srv.url, vocab)
        return out
    finally:
        srv.stop()


def on_ray(name: str, model: str, jobs, args, vocab: int, http_port: int) -> dict:
    from ray import serve

    from gpt2_onnx.distributed import APP_NAME, ServeOptions, build

    replicas, threads, rows = CONFIGS[name]
    options = ServeOptions(model=model, provider="cpu", replicas=replicas, threads=threads, max_batch=rows)
    serve.run(build(options), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_health(url, replicas)
        load(url, 8, jobs[:8], args.max_tokens)  # warm-up
        procs = ray_processes()
        idle = {k: cpu_seconds(v) for k, v in procs.items()}
        time.sleep(3)  # what the proxy and the ingress use doing nothing (health checks, metrics, long polls)
        before = {k: cpu_seconds(v) for k, v in procs.items()}
        idle = {k: (before[k] - idle[k]) / 3 for k in procs}
        out = load(url, args.clients, jobs, args.max_tokens)
        for k, v in procs.items():
            busy = cpu_seconds(v) - before[k] - idle[k] * out["wall_s"]
            out[f"{k}_idle_cpu_percent"] = 100 * idle[k]
            out[f"{k}_cpu_ms_per_request"] = 1e3 * busy / len(jobs)
        out["latency_1_token_ms"] = latency(url, vocab)
        return out
    finally:
        serve.delete(APP_NAME)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="124m,bundled", help="124m (random-init GPT2Config()) and/or bundled")
    ap.add_argument("--checkpoint", default=None, help="HF folder for '124m' [default: random-init GPT2Config()]")
    ap.add_argument("--requests", type=int, default=64, help="requests per measurement (124m)")
    ap.add_argument("--requests-bundled", type=int, default=512, help="requests per measurement (bundled: 8x faster)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--name", default="replicas")
    add_out(ap)
    args = ap.parse_args()

    from ray import serve

    from gpt2_onnx import Engine
    from gpt2_onnx.distributed import connect

    connect(None, num_cpus=os.cpu_count())
    http_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    result = {"command": "python -m benchmarks.replicas " + " ".join(sys.argv[1:]), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_before": os.getloadavg(),
              "requests": {"124m": args.requests, "bundled": args.requests_bundled}, "clients": args.clients, "max_tokens": args.max_tokens,
              "configs": {"single process x 2 threads (no Ray)": [1, 2, 32], **{k: list(v) for k, v in CONFIGS.items()}},
              "models": {}}
    try:
        for model_name in args.models.split(","):
            if model_name == "124m":
                model, n = str(checkpoint(args.checkpoint)), args.requests
            elif model_name == "bundled":
                model, n = None, args.requests_bundled
            else:
                raise SystemExit(f"--models: unknown model {model_name!r} (124m, bundled)")
            eng = Engine.load(model, provider="cpu")  # export once, before any timing
            folder, vocab = str(eng.folder), eng.config.vocab_size
            del eng
            rng = np.random.default_rng(0)
            jobs = [rng.integers(0, vocab - 1, 32).tolist() for _ in range(n)]
            rounds = []
            for r in range(args.rounds):
                order = ["single", *CONFIGS] if r % 2 == 0 else [*reversed(CONFIGS), "single"]
                row = {}
                for name in order:
                    print(f"{model_name} round {r + 1}: {name}", file=sys.stderr, flush=True)
                    if name == "single":
                        row["single process x 2 threads (no Ray)"] = single(folder, jobs, args, vocab)
                    else:
                        row[name] = on_ray(name, folder, jobs, args, vocab, http_port)
                    last = row[next(reversed(row))]
                    print(f"  {last['tok_s']:.1f} tok/s, 1-token latency {last['latency_1_token_ms']:.1f} ms",
                          file=sys.stderr, flush=True)
                ref = row["single process x 2 threads (no Ray)"]["answers"]
                for v in row.values():
                    v["identical_to_single_process"] = v.pop("answers") == ref
                rounds.append(row)
            result["models"][model_name] = rounds
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    result["load_average_after"] = os.getloadavg()
    write_results(args.out, args.name, result, markdown)


def markdown(res: dict) -> str:
    m = res["machine"]
    la, lb = res["load_average_before"], res["load_average_after"]
    lines = [f"`{res['command']}`", "",
             f"{res['date']}, {m['cpu']} ({m['cpus']} CPUs; {' '.join(m['flags'])}); load average "
             f"{la[0]:.2f} before, {lb[0]:.2f} after. Greedy requests of {res['max_tokens']} tokens (32-token prompts; "
             f"{res['requests']['124m']} per measurement on 124m, {res['requests']['bundled']} on bundled), "
             f"{res['clients']} concurrent clients, 32 KV rows in total in every configuration.", ""]
    for model, rounds in res["models"].items():
        names = list(rounds[0])
        lines += [f"### {model}: completion tokens/s (median request latency s)", "",
                  "| configuration | " + " | ".join(f"round {i + 1}" for i in range(len(rounds)))
                  + " | 1-token ms | proxy + ingress CPU ms/request | answers = single process |",
                  "|---|" + "---|" * (len(rounds) + 3)]
        for name in names:
            cells = [f"{r[name]['tok_s']:.1f} ({r[name]['median_latency_s']:.2f})" for r in rounds]
            lat = "/".join(f"{r[name]['latency_1_token_ms']:.1f}" for r in rounds)
            cpu = "/".join(f"{r[name]['proxy_cpu_ms_per_request'] + r[name]['ingress_cpu_ms_per_request']:.1f}"
                           for r in rounds) if "proxy_cpu_ms_per_request" in rounds[0][name] else "-"
            same = all(r[name]["identical_to_single_process"] for r in rounds)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {lat} | {cpu} | {same} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
