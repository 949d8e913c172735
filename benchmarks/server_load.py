"""Server throughput: N requests one after another vs the same N from concurrent clients (loopback only).

    python -m benchmarks.server_load [-m MODEL] [--clients 16] [--requests 32] [--max-tokens 64]

Starts `gpt2-onnx serve` on 127.0.0.1 (a random free port) in its own process; the clients run
here, bounded in requests and time. Checks every greedy answer equals the sequential one.
"""

from __future__ import annotations

import argparse
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from benchmarks.__main__ import save_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--port", str(port), "--max-batch", str(args.clients),
           "--threads", str(args.threads)] + (["-m", args.model] if args.model else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # its own process
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline or server.poll() is not None:
            server.kill()
            raise SystemExit("server did not start")
        time.sleep(0.2)
    url = f"http://127.0.0.1:{port}/v1/completions"
    prompts = [f"{name}:\n" for name in ["ROMEO", "JULIET", "KING HENRY", "HAMLET", "First Citizen", "MENENIUS",
                                         "GLOUCESTER", "LADY ANNE"]]
    jobs = [prompts[i % len(prompts)] + " " * (i // len(prompts)) for i in range(args.requests)]

    client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=args.clients))  # pooled, thread-safe

    def one(p):
        r = client.post(url, json={"prompt": p, "max_tokens": args.max_tokens, "temperature": 0})
        r.raise_for_status()
        return r.json()

    t = time.perf_counter()
    seq = [one(p) for p in jobs]
    t_seq = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        conc = list(pool.map(one, jobs))
    t_conc = time.perf_counter() - t
    server.terminate()
    server.wait(30)
    tokens = sum(r["usage"]["completion_tokens"] for r in seq)
    out = {"requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
           "sequential_tok_s": tokens / t_seq, "concurrent_tok_s": sum(r["usage"]["completion_tokens"] for r in conc) / t_conc,
           "identical_answers": [r["choices"][0]["text"] for r in seq] == [r["choices"][0]["text"] for r in conc]}
    out["speedup"] = out["concurrent_tok_s"] / out["sequential_tok_s"]
    save_json("server_load", out)


if __name__ == "__main__":
    main()
