"""In-process AsyncEngine against one-caller Engine.generate threads and the HTTP server (loopback).

    python -m benchmarks.inprocess [--models bundled,124m] [--clients 1,16,64] [--requests N]
                                   [--repeat 2] [--baseline DIR] [--code REV] [--threads 2] [--max-batch 16]

The same greedy requests (prompt `ROMEO {i}: The quick brown fox` tokenized by the model's tokenizer,
--max-tokens new tokens, ignore_eos) go, with N concurrent callers each sending its requests one
after another, to:

  in-process          AsyncEngine(engine, max_batch=--max-batch); N threads submit() and result()
                      (also max_batch 64 at concurrencies above --max-batch)
  threads x generate  N threads sharing one Engine, each calling engine.generate (a batch-1 loop per call)
  server              `gpt2-onnx serve` from this tree in a process of its own, N HTTP clients
  server before       the same server from --baseline DIR (a `git worktree` of another commit), its own code

One server process is alive at a time; onnxruntime gets --threads threads everywhere. Each
measurement runs --repeat times, the order of the systems reversed every other repetition; tables
show every repetition and ratios use the medians. Greedy answers are checked against the first
in-process run: token ids where the system returns them (in-process, generate), text and token
count for the servers. Load average and the CPU time of other processes are recorded around each
measurement (this machine may be shared); a measurement during which other processes took more
than --max-other of the CPUs is run again (up to --retries times). The code under test is copied
at the start (the working tree, or commit --code REV) and both the in-process systems and the
server run that copy, so that edits to the tree during the run change nothing.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import add_out, checkpoint, machine, write_results
from benchmarks.server_load import HERE, Served, checkout_env, concurrent

PROMPT = "ROMEO {i}: The quick brown fox"
HANG_S = 900  # a measurement running longer than this dumps every thread's stack and exits


CODE = ("engine", "export", "models")


def snapshot(root: Path, rev: str | None = None) -> Path:
    """A copy of root's engine/, export/ and models/ (as they are now, or at commit rev), for the whole run."""
    dest = Path(tempfile.mkdtemp(prefix="gpt2-onnx-snapshot-"))
    if rev:
        archive = subprocess.run(["git", "-C", str(root), "archive", rev, *CODE], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        return dest
    for sub in CODE:
        shutil.copytree(root / sub, dest / sub, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def code_state(root: Path, rev: str | None = None) -> dict:
    """The commit and (without rev) the uncommitted changes of root's code (engine/, export/, models/)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()

    if rev:
        return {"commit": git("rev-parse", rev), "uncommitted": [], "diff_sha256": None}
    diff = git("diff", "HEAD", "--", *CODE)
    return {"commit": git("rev-parse", "HEAD"), "uncommitted": git("status", "--short", "--", *CODE).splitlines(),
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}


def busy_s() -> float:
    """CPU seconds spent busy by the whole machine so far (all cores; /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int | None) -> float:
    """CPU seconds of this process (pid None) or of process pid."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class InProcess:
    """AsyncEngine over the shared Engine; each caller thread submits and blocks on result()."""

    returns_ids = True
    pid = None

    def __init__(self, engine, max_batch: int, max_tokens: int):
        from gpt2_onnx import AsyncEngine, GenerationOptions

        self.llm = AsyncEngine(engine, max_batch=max_batch)
        self.options = GenerationOptions(max_new_tokens=max_tokens, ignore_eos=True)
        self.max_batch = max_batch

    def __call__(self, ids: list[int]) -> tuple[list[int] | None, str, int]:
        r = self.llm.submit(ids, self.options).result()[0]
        return r.token_ids, r.text, len(r.token_ids)

    def describe(self) -> dict:
        return {"max_batch": self.max_batch, "max_queue": self.llm.max_queue, "stats": self.llm.stats()}

    def stop(self) -> None:
        self.llm.shutdown()


class Generate:
    """engine.generate from each caller thread: one Engine, one batch-1 decode loop per call."""

    returns_ids = True
    pid = None

    def __init__(self, engine, max_tokens: int):
        self.engine, self.max_tokens = engine, max_tokens

    def __call__(self, ids: list[int]) -> tuple[list[int] | None, str, int]:
        r = self.engine.generate(ids, max_new_tokens=self.max_tokens, ignore_eos=True)
        return r.token_ids, r.text, len(r.token_ids)

    def describe(self) -> dict:
        return {}

    def stop(self) -> None:
        pass


class Server:
    """`gpt2-onnx serve` (server_load's Served) from root; callers post /v1/completions with the prompt's ids."""

    returns_ids = False

    def __init__(self, root: Path, model: str | None, *, threads: int, max_batch: int, max_tokens: int,
                 env: dict | None = None):
        self.srv = Served(root, model, threads=threads, max_batch=max_batch, env=env)
        self.pid = self.srv.proc.pid
        self.client = httpx.Client(timeout=HANG_S, limits=httpx.Limits(max_connections=256))
        self.body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        r = self.client.post(self.srv.url + "/v1/completions", json={**self.body, "prompt": [0]})
        # a server from before ignore_eos existed refuses the field (400 or 422, naming it)
        self.ignore_eos = not (r.status_code >= 400 and "ignore_eos" in r.text)
        if not self.ignore_eos:
            del self.body["ignore_eos"]

    def __call__(self, ids: list[int]) -> tuple[list[int] | None, str, int]:
        r = self.client.post(self.srv.url + "/v1/completions", json={**self.body, "prompt": ids})
        r.raise_for_status()
        body = r.json()
        return None, body["choices"][0]["text"], body["usage"]["completion_tokens"]

    def describe(self) -> dict:
        return {"url": self.srv.url, "ignore_eos_sent": self.ignore_eos}

    def stop(self) -> None:
        self.client.close()
        self.srv.stop()


def wait_quiet(limit_s: float, share: float = 0.25) -> dict:
    """Wait (up to limit_s) until the other processes use under `share` of the CPUs over one second."""
    t0, seen = time.time(), []
    while True:
        b0, o0 = busy_s(), proc_cpu_s(None)
        time.sleep(1.0)
        seen.append(max(0.0, busy_s() - b0 - (proc_cpu_s(None) - o0)) / (os.cpu_count() or 1))
        if seen[-1] < share or time.time() - t0 >= limit_s:
            return {"waited_s": time.time() - t0, "quiet": seen[-1] < share, "other_cpu_share_at_start": seen[-1]}


def measure(system, clients: int, jobs: list[list[int]], quiet_s: float = 0.0) -> dict:
    """`clients` threads share jobs (server_load.concurrent); tok/s, latencies, answers, machine load around it."""
    def one(i: int):
        t = time.perf_counter()
        ids, text, n = system(jobs[i])
        return i, ids, text, n, time.perf_counter() - t

    waited = wait_quiet(quiet_s) if quiet_s > 0 else {}
    load0, busy0, own0, srv0 = os.getloadavg(), busy_s(), proc_cpu_s(None), proc_cpu_s(system.pid)
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        done, wall = concurrent(clients, len(jobs), one)
    finally:
        faulthandler.cancel_dump_traceback_later()
    busy = busy_s() - busy0
    ours = proc_cpu_s(None) - own0 + (proc_cpu_s(system.pid) - srv0 if system.pid else 0.0)
    done.sort(key=lambda d: d[0])
    lat = [d[4] for d in done]
    tokens = sum(d[3] for d in done)
    return {"clients": clients, "requests": len(jobs), "completion_tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "median_latency_s": statistics.median(lat),
            "p90_latency_s": float(np.percentile(lat, 90)),
            "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg()),
            "cpu_busy_s": busy, "cpu_ours_s": ours,
            "other_cpu_share": max(0.0, busy - ours) / (wall * (os.cpu_count() or 1)),
            "wait_for_quiet": waited, "tokens_per_request": [d[3] for d in done],
            "ids": [d[1] for d in done], "texts": [d[2] for d in done]}


def per_client(args, clients: int) -> int:
    """--requests, else 4 requests in all at 1 caller and one per caller from 4 callers on."""
    return args.requests if args.requests else -(-4 // clients)


def run_model(args, name: str, model: str | None, code: tuple[Path, dict | None]) -> dict:
    """Every system at every concurrency, --repeat times (order reversed every other time)."""
    from gpt2_onnx import Engine

    engine = Engine.load(model, provider="cpu", threads=args.threads)
    n = max(c * per_client(args, c) for c in args.clients)
    jobs = [engine.tokenizer.encode(PROMPT.format(i=i)) for i in range(n)]
    big = max(64, args.max_batch)
    systems = [
        ("in-process", lambda: InProcess(engine, args.max_batch, args.max_tokens), args.clients),
        (f"in-process max_batch {big}", lambda: InProcess(engine, big, args.max_tokens),
         [c for c in args.clients if c > args.max_batch] if big > args.max_batch else []),
        ("threads x generate", lambda: Generate(engine, args.max_tokens), args.clients),
        ("server", lambda: Server(code[0], model, threads=args.threads, max_batch=args.max_batch,
                                  max_tokens=args.max_tokens, env=code[1]), args.clients)]
    if args.baseline:
        env = checkout_env(Path(args.baseline))
        systems.append(("server before", lambda: Server(Path(args.baseline), model, threads=args.threads,
                                                        max_batch=args.max_batch, max_tokens=args.max_tokens,
                                                        env=env), args.clients))
    systems = [s for s in systems if s[2]]
    runs: dict[str, dict[int, list[dict]]] = {label: {c: [] for c in levels} for label, _, levels in systems}
    described: dict[str, dict] = {}
    for rep in range(args.repeat):
        for label, start, levels in (systems if rep % 2 == 0 else systems[::-1]):
            print(f"{name}: {label} (repetition {rep + 1})", file=sys.stderr, flush=True)
            system = start()
            try:
                system(jobs[0][:4])  # warm-up, untimed
                for c in levels:
                    noisy = []
                    while True:  # a measurement during which other processes took the CPUs is run again
                        row = measure(system, c, jobs[: c * per_client(args, c)], args.wait_quiet)
                        if row["other_cpu_share"] <= args.max_other or len(noisy) >= args.retries:
                            break
                        noisy.append({k: row[k] for k in ("tok_s", "median_latency_s", "other_cpu_share",
                                                          "loadavg_before", "loadavg_after")})
                        print(f"  {c:3d} callers: {row['tok_s']:.1f} tok/s with {100 * row['other_cpu_share']:.0f}% "
                              "of the CPUs taken by other processes: measuring again", file=sys.stderr, flush=True)
                    row["repetition"], row["discarded_noisy_attempts"] = rep + 1, noisy
                    runs[label][c].append(row)
                    print(f"  {c:3d} callers: {row['tok_s']:.1f} tok/s, median {row['median_latency_s']:.2f} s, "
                          f"load {row['loadavg_before'][0]:.1f} -> {row['loadavg_after'][0]:.1f}, other CPU "
                          f"{100 * row['other_cpu_share']:.0f}%", file=sys.stderr, flush=True)
                described[label] = system.describe()
            finally:
                system.stop()
    engine = None  # the systems hold no model now: free it before summarizing
    return summarize(runs, described, systems, jobs)


def summarize(runs: dict, described: dict, systems: list, jobs: list[list[int]]) -> dict:
    """Medians per system and concurrency; every answer checked against the first in-process run."""
    ref_ids, ref_texts = [], []  # request i: the first repetition's in-process answer, fewest callers first
    for c in sorted(runs["in-process"]):
        first = runs["in-process"][c][0]
        ref_ids += first["ids"][len(ref_ids):]
        ref_texts += first["texts"][len(ref_texts):]
    out: dict = {"prompts": [PROMPT.format(i=i) for i in range(len(jobs))], "prompt_ids": jobs,
                 "reference_ids": ref_ids, "systems": {}}
    for label, _, _ in systems:
        rows = []
        for c, reps in runs[label].items():
            for r in reps:
                k = len(r["texts"])
                r["mismatched_requests"] = [
                    i for i in range(k)
                    if (r["ids"][i] != ref_ids[i] if r["ids"][i] is not None else r["texts"][i] != ref_texts[i])]
                r["compared"] = "token ids" if r["ids"][0] is not None else "text and token count"
                r["short_requests"] = [i for i, t in enumerate(r["tokens_per_request"]) if t != len(ref_ids[i])]
                r.pop("ids"), r.pop("texts")
            rows.append({"clients": c, "tok_s": statistics.median(r["tok_s"] for r in reps),
                         "median_latency_s": statistics.median(r["median_latency_s"] for r in reps),
                         "p90_latency_s": statistics.median(r["p90_latency_s"] for r in reps),
                         "tok_s_runs": [r["tok_s"] for r in reps],
                         "identical": all(not r["mismatched_requests"] and not r["short_requests"] for r in reps),
                         "runs": reps})
        out["systems"][label] = {"config": described.get(label, {}), "levels": rows}
    return out


def level(res: dict, system: str, clients: int) -> dict | None:
    for row in res["systems"].get(system, {}).get("levels", []):
        if row["clients"] == clients:
            return row
    return None


def targets(res: dict, clients: list[int]) -> dict:
    """The three claims, on medians (and whether they hold in every repetition)."""
    def ratio(a: str, b: str, c: int) -> dict | None:
        x, y = level(res, a, c), level(res, b, c)
        if not x or not y:
            return None
        return {"median": x["tok_s"] / y["tok_s"], "runs": [p / q for p, q in zip(x["tok_s_runs"], y["tok_s_runs"])]}

    out = {}
    for c in clients:
        out[f"in-process / server @{c}"] = ratio("in-process", "server", c)
        out[f"in-process / threads x generate @{c}"] = ratio("in-process", "threads x generate", c)
        out[f"server / server before @{c}"] = ratio("server", "server before", c)
    checks = {
        "in-process >= server at every concurrency": [out[f"in-process / server @{c}"] for c in clients],
        "in-process >= 4x threads x generate at 16 callers": [out.get("in-process / threads x generate @16")],
        "server not slower than server before": [out[f"server / server before @{c}"] for c in clients],
    }
    limit = {"in-process >= 4x threads x generate at 16 callers": 4.0}
    verdict = {}
    for claim, ratios in checks.items():
        ratios = [r for r in ratios if r]
        if not ratios:
            verdict[claim] = {"holds": None}
            continue
        lo = limit.get(claim, 1.0)
        verdict[claim] = {"holds": all(r["median"] >= lo for r in ratios),
                          "holds_in_every_repetition": all(x >= lo for r in ratios for x in r["runs"])}
    return {"ratios": out, "verdict": verdict}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"`{res['command']}`", "",
             f"{res['date']}, {m['cpu']} ({m['cpus']} CPUs; {' '.join(m['flags'])}), onnxruntime {res['threads']} "
             f"threads everywhere, max_batch {res['max_batch']} (in-process and servers), {res['max_tokens']} greedy "
             f"tokens per request (ignore_eos), prompts `{PROMPT}`.",
             f"Code: {'commit' if res.get('code_rev') else 'this tree at'} {res['code']['commit'][:7]}"
             + (f" with uncommitted changes to {len(res['code']['uncommitted'])} files" if res["code"]["uncommitted"]
                else "")
             + (", copied at the start (in-process and server run that copy)" if res["code"].get("snapshot") else "")
             + (f"; server before: {res['baseline_commit'][:7]}." if res.get("baseline_commit") else "."),
             f"Requests: {res['requests']}. Each cell: median tok/s (each of {res['repeat']} repetitions, the order "
             "of the systems reversed every other one); ratios use the medians. Completion tokens/s counts every "
             "request's new tokens over the wall time of the whole level.", ""]
    for model, r in res["models"].items():
        big = next((s for s in r["systems"] if s.startswith("in-process max_batch")), None)
        cols = ["in-process", "threads x generate", "server", "server before"]
        lines += [f"### {model}: completion tokens/s by concurrent callers", "",
                  "| clients | " + " | ".join(cols) + " | in-process / server | in-process / threads x generate "
                  "| server / server before |", "|---|" + "---|" * (len(cols) + 3)]

        def cell(system: str, c: int) -> str:
            row = level(r, system, c)
            if not row:
                return "-"
            runs = " / ".join(f"{t:.1f}" for t in row["tok_s_runs"])
            return f"{row['tok_s']:.1f} ({runs})" + ("" if row["identical"] else " **answers differ**")

        def rat(a: str, b: str, c: int) -> str:
            x, y = level(r, a, c), level(r, b, c)
            return f"{x['tok_s'] / y['tok_s']:.2f}x" if x and y else "-"

        for c in res["clients"]:
            lines.append(f"| {c} | " + " | ".join(cell(s, c) for s in cols) + f" | {rat('in-process', 'server', c)} | "
                         f"{rat('in-process', 'threads x generate', c)} | {rat('server', 'server before', c)} |")
        for c in [x["clients"] for x in r["systems"].get(big, {}).get("levels", [])]:
            lines.append(f"| {c}, {big} | {cell(big, c)} | | | | {rat(big, 'server', c)} | "
                         f"{rat(big, 'threads x generate', c)} | |")
        lines += ["", "Latency per request, seconds, median / p90 (medians over the repetitions):", "",
                  "| clients | " + " | ".join(s for s in r["systems"]) + " |", "|---|" + "---|" * len(r["systems"])]
        for c in res["clients"]:
            cells = []
            for s in r["systems"]:
                row = level(r, s, c)
                cells.append(f"{row['median_latency_s']:.2f} / {row['p90_latency_s']:.2f}" if row else "-")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
        bad = [(s, row["clients"], x["repetition"], x["mismatched_requests"], x["short_requests"], x["compared"])
               for s, v in r["systems"].items() for row in v["levels"] for x in row["runs"]
               if x["mismatched_requests"] or x["short_requests"]]
        if bad:
            lines.append("Answers that differ from the first in-process run:")
            lines += [f"- {s}, {c} callers, repetition {k}: requests {mis} differ ({how}); requests {short} have "
                      f"another token count" for s, c, k, mis, short, how in bad]
        else:
            lines.append("Every answer identical to the first in-process run (token ids for in-process and "
                         "threads x generate; text and token count for the servers, which return no ids).")
        cfg = r["systems"].get("server before", {}).get("config", {})
        if cfg and not cfg.get("ignore_eos_sent"):
            lines.append("The server before has no ignore_eos: its requests were sent without it (token counts "
                         "above are checked).")
        t = r["targets"]
        lines += ["", "Targets (on medians; in every repetition):", ""]
        for claim, v in t["verdict"].items():
            lines.append(f"- {claim}: {v['holds']}" + (f" ({v['holds_in_every_repetition']})"
                                                         if v.get("holds") is not None else " (not measured)"))
        lines.append("")
    loads = [(model, s, row["clients"], x) for model, r in res["models"].items()
             for s, v in r["systems"].items() for row in v["levels"] for x in row["runs"]]
    limit = res.get("max_other", 0.15)
    busy = [(model, s, c, x) for model, s, c, x in loads if x["other_cpu_share"] > limit]
    redone = sum(len(x.get("discarded_noisy_attempts", [])) for *_, x in loads)
    la = [x["loadavg_before"][0] for *_, x in loads] + [x["loadavg_after"][0] for *_, x in loads]
    lines += ["### Machine load", "",
              f"1-minute load average around the measurements: {min(la):.1f} to {max(la):.1f} on {m['cpus']} CPUs "
              "(this counts runnable threads, this benchmark's own included: threads x generate at 64 callers alone "
              "keeps ~64 threads runnable, and the average decays over the next measurements; it is no sign of other "
              "work). CPU time of other processes during a measurement (machine busy time from /proc/stat minus "
              "this process's and the server's), as a share of all CPUs: "
              + (f"above {100 * limit:.0f}% in {len(busy)} of {len(loads)} measurements (kept after "
                 f"up to {res.get('retries', 0) + 1} attempts each): "
                 + "; ".join(f"{model} {s} @{c} rep {x['repetition']}: {100 * x['other_cpu_share']:.0f}% "
                             f"(load {x['loadavg_before'][0]:.1f} -> {x['loadavg_after'][0]:.1f})"
                             for model, s, c, x in busy)
                 if busy else f"at most {100 * max(x['other_cpu_share'] for *_, x in loads):.0f}% in the kept "
                 "measurements.")
              + (f" {redone} attempts were discarded and measured again because other processes took more than "
                 f"{100 * limit:.0f}% of the CPUs (in the JSON: discarded_noisy_attempts)." if redone else ""), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bundled,124m", help="bundled and/or 124m (random-init GPT2Config(), "
                                                             "GPT-2's BPE)")
    ap.add_argument("--checkpoint", default=None, help="HF folder for '124m' [default: random-init GPT2Config()]")
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per caller [default: 4 in all at 1 caller, 1 per caller from 4 callers on]")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="checkout of another commit to serve 'server before' from")
    ap.add_argument("--wait-quiet", type=float, default=120.0,
                    help="before each measurement, wait up to this many seconds for other processes to use under "
                         "25%% of the CPUs (0: don't) [default: 120]")
    ap.add_argument("--max-other", type=float, default=0.15,
                    help="a measurement during which other processes used more than this share of the CPUs is "
                         "measured again (discarded attempts stay in the JSON) [default: 0.15]")
    ap.add_argument("--retries", type=int, default=3, help="how many times at most [default: 3]")
    ap.add_argument("--code", default=None, metavar="REV",
                    help="measure this commit of the tree (git archive) instead of the working tree")
    ap.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                    help="run the tree as it is on disk at each server start, instead of a copy made at the start")
    ap.add_argument("--name", default="inprocess")
    add_out(ap)
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    result = {"command": "python -m benchmarks.inprocess " + " ".join(sys.argv[1:]), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "max_batch": args.max_batch,
              "max_tokens": args.max_tokens, "repeat": args.repeat, "clients": args.clients,
              "code_rev": args.code, "max_other": args.max_other, "retries": args.retries,
              "wait_quiet_s": args.wait_quiet,
              "requests": ", ".join(f"{c * per_client(args, c)} at {c} callers" for c in args.clients),
              "baseline": args.baseline, "models": {}}
    result["code"] = code_state(HERE, args.code)
    code: tuple[Path, dict | None] = (HERE, None)
    if args.snapshot or args.code:  # others may change the tree during the run: every system runs this copy of it
        root = snapshot(HERE, args.code)
        env = checkout_env(root)
        sys.path.insert(0, env["PYTHONPATH"].split(os.pathsep)[0])  # before the first import of gpt2_onnx
        code = (root, env)
        result["code"]["snapshot"] = str(root)
    import gpt2_onnx

    result["code"]["gpt2_onnx"] = gpt2_onnx.__file__
    if args.baseline:
        result["baseline_commit"] = code_state(Path(args.baseline))["commit"]
    for name in args.models.split(","):
        if name == "bundled":
            model = None
        elif name == "124m":
            model = str(checkpoint(args.checkpoint))
        else:
            raise SystemExit(f"--models: unknown model {name!r} (bundled, 124m)")
        res = run_model(args, name, model, code)
        res["targets"] = targets(res, args.clients)
        result["models"][name] = res
    write_results(args.out, args.name, result, markdown)


if __name__ == "__main__":
    main()
