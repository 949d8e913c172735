"""The server held under load with faults injected, then stopped with SIGTERM mid-load (loopback only).

    python -m benchmarks.reliability [-m MODEL] [--clients 32] [--requests 12] [--seed 0]

`gpt2-onnx serve` runs in its own process on 127.0.0.1. Phase 1: --clients clients each send
--requests requests, a seeded mix of plain and streamed completions, malformed bodies and fields,
requests that can never fit, and clients that hang up mid-request. Phase 2: 16 streams are running
when the server gets SIGTERM (grace 1 s). Counted: every response by status, unexpected 5xx, lost
requests (no answer, or a stream cut without [DONE] or an error event), 503s (only while shutting
down). Writes reliability_server.json to --out.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from benchmarks.common import add_out, save_json
from benchmarks.server_load import free_port, wait_healthy

BAD = [b"{", b"[]", b'{"prompt": 5}', b'{"prompt": "x", "max_tokens": -1}', b'{"prompt": "x", "temperature": "hot"}',
       b'{"prompt": "x", "stop": 5}', b'{"prompt": "x", "bogus": 1}', b"[" * 5000, '{"prompt": "a\\ud800"}'.encode(),
       b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", b'{"prompt": "x", "logprobs": 99}',
       b'{"prompt": "x", "n": 16, "max_tokens": 100000}', b'{"prompt": "\xff\xfe"}', b'{"prompt": "x", "model": "nope"}']


def start(model: str | None, grace: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gpt2_onnx.cli", "serve", "--port", str(port), "--grace-period", str(grace),
           "--max-queue", "128"] + (["-m", model] if model else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, timeout=600, what="server")
    return proc, url


def stream(client: httpx.Client, url: str, body: dict) -> str:
    """'done', 'error-event' or 'truncated' (and the HTTP status of a refused stream)."""
    last = ""
    try:
        with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return str(r.status_code)
            for line in r.iter_lines():
                if line.startswith("data:"):
                    last = line
    except httpx.HTTPError:
        return "truncated"
    return "done" if last == "data: [DONE]" else "error-event" if '"error"' in last else "truncated"


def phase1(url: str, clients: int, requests: int, seed: int) -> dict:
    counts: Counter = Counter()
    client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=clients))

    def one(k: int) -> str:
        rng = random.Random(seed * 100_003 + k)
        kind = rng.choices(["plain", "stream", "bad", "hangup", "huge-n"], [50, 20, 20, 8, 2])[0]
        body = {"prompt": rng.choice(["ROMEO:", "JULIET:\n", "To be", ""]), "max_tokens": rng.randint(1, 40),
                "temperature": rng.choice([0, 0.8, 1e-300]), "seed": rng.randint(0, 9), "n": rng.randint(1, 3)}
        try:
            if kind == "plain":
                return f"plain {client.post(url + '/v1/completions', json=body).status_code}"
            if kind == "stream":
                return f"stream {stream(client, url, body)}"
            if kind == "bad":
                r = client.post(url + "/v1/completions", content=rng.choice(BAD),
                                headers={"content-type": "application/json"})
                ok_json = r.headers.get("content-type", "").startswith("application/json") and "error" in r.json()
                return f"bad {r.status_code}{'' if ok_json else ' not-json'}"
            if kind == "huge-n":
                r = client.post(url + "/v1/completions", json={"prompt": ["x"] * 64, "n": 16, "max_tokens": 4})
                return f"never-fits {r.status_code}"
            try:  # a client that hangs up mid-request
                httpx.post(url + "/v1/completions", json={**body, "max_tokens": 200, "n": 4}, timeout=0.05)
                return "hangup finished-first"
            except httpx.TimeoutException:
                return "hangup client-gone"
        except httpx.HTTPError as e:
            return f"{kind} lost ({type(e).__name__})"

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for outcome in pool.map(one, range(clients * requests)):
            counts[outcome] += 1
    wall = time.perf_counter() - t
    time.sleep(0.5)
    metrics = client.get(url + "/metrics").text
    client.close()
    served = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith('gpt2onnx_requests_total{status=')}
    return {"requests": clients * requests, "clients": clients, "wall_s": wall, "outcomes": dict(sorted(counts.items())),
            "server_counted": served}


def phase2(url: str, proc: subprocess.Popen) -> dict:
    client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=20))
    with ThreadPoolExecutor(20) as pool:
        streams = [pool.submit(stream, client, url, {"prompt": f"ROMEO {i}:", "max_tokens": 200, "n": 4,
                                                     "temperature": 0}) for i in range(16)]
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        late = []
        for _ in range(4):  # new work while draining: 503, or refused at connect once the port is closed
            try:
                late.append(str(httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=5).status_code))
            except httpx.ConnectError:
                late.append("refused")
        outcomes = Counter(f.result() for f in streams)
    client.close()
    code = proc.wait(60)
    return {"streams_in_flight": 16, "stream_outcomes": dict(outcomes), "requests_while_draining": dict(Counter(late)),
            "exit_code": code}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    add_out(ap)
    args = ap.parse_args()
    proc, url = start(args.model, grace=1.0)
    try:
        load = phase1(url, args.clients, args.requests, args.seed)
        stop = phase2(url, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    unexpected_5xx = sum(v for k, v in load["outcomes"].items() if k.split()[1][:1] == "5")
    lost = sum(v for k, v in load["outcomes"].items() if "lost" in k or "truncated" in k or "not-json" in k)
    lost += stop["stream_outcomes"].get("truncated", 0)
    save_json(args.out, "reliability_server", {
        "command": "python -m benchmarks.reliability " + " ".join(sys.argv[1:]),
        "load": load, "sigterm": stop, "unexpected_5xx": unexpected_5xx, "lost": lost})


if __name__ == "__main__":
    main()
