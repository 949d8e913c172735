"""Export cache faults injected with real processes, counted over trials (benchmarks/results/reliability.md).

    python -m benchmarks.cache_faults [--trials 10] [--procs 4] [--delay 2] [--checkpoint DIR|bundled]

concurrent: --procs `gpt2-onnx generate -m CHECKPOINT` first runs at once on an empty cache, each
export held --delay seconds just before it publishes (SLOW_EXPORT); counts the runs that exit 0, the
trials where all did with one output, the exports made and the folders left in the cache.
killed: an export SIGKILLed once its temp folder is complete, then a plain rerun; counts the reruns
that exit 0 and the temp folders left after them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_out, save_json

# Runs the CLI with a delay injected into the export: once its temp folder is complete, just before it
# is published, the export says so on stderr and waits (argv[1]: seconds, or a file to wait for).
SLOW_EXPORT = """
import os, sys, time
from gpt2_onnx import cli
from gpt2_onnx.export import exporter
wait, real = sys.argv.pop(1), exporter.write_tokenizer
def slow(*args, **kwargs):
    real(*args, **kwargs)
    print("test hook: export about to publish", file=sys.stderr, flush=True)
    if wait.replace(".", "").isdigit():
        time.sleep(float(wait))
    else:
        deadline = time.time() + 120
        while not os.path.exists(wait) and time.time() < deadline:
            time.sleep(0.05)
exporter.write_tokenizer = slow
sys.argv[0] = "gpt2-onnx"
cli.main()
"""
HOOK_LINE = "test hook: export about to publish"
TIMEOUT = 300


def slow_cli(wait, *args, cache: Path) -> subprocess.Popen:
    """The CLI in a subprocess on the cache `cache`, its export held by `wait` (SLOW_EXPORT)."""
    return subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(wait), *map(str, args)],
                            env={**os.environ, "GPT2_ONNX_CACHE": str(cache)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def temp_dirs(cache: Path) -> list[Path]:
    """Temp folders of exports (.NAME.xxxxxxxx) in the cache."""
    return sorted(p for p in cache.iterdir() if p.name.startswith(".") and p.is_dir()) if cache.is_dir() else []


def exports(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else []


def concurrent(ck: Path, cache: Path, procs: int, delay: float) -> dict:
    runs = [slow_cli(delay, "generate", "-m", ck, "the quick", "-n", "4", cache=cache) for _ in range(procs)]
    done = [(p.returncode, out, err) for p in runs for out, err in [p.communicate(timeout=TIMEOUT)]]
    errors = [err.strip().splitlines()[-1] if err.strip() else f"exit {rc}" for rc, _, err in done if rc]
    return {"ok": sum(rc == 0 for rc, _, _ in done), "same_output": len({out for _, out, _ in done}) == 1,
            "exported": sum(HOOK_LINE in err for _, _, err in done), "exports": len(exports(cache)),
            "temp_dirs": len(temp_dirs(cache)), "errors": errors}


def killed(ck: Path, cache: Path) -> dict:
    p = slow_cli(120, "generate", "-m", ck, "x", "-n", "2", cache=cache)
    deadline = time.time() + TIMEOUT
    while not any((d / "tokenizer.json").is_file() for d in temp_dirs(cache)) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=TIMEOUT)
    orphans = len(temp_dirs(cache))
    r = subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", "generate", "-m", str(ck), "x", "-n", "2"],
                       env={**os.environ, "GPT2_ONNX_CACHE": str(cache)}, capture_output=True, text=True,
                       timeout=TIMEOUT)
    return {"orphans_after_kill": orphans, "rerun_ok": r.returncode == 0,
            "temp_dirs_after_rerun": len(temp_dirs(cache)), "exports": len(exports(cache))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--delay", type=float, default=2.0)
    ap.add_argument("--checkpoint", default=None, help="HF folder, or bundled [default: a tiny random-init GPT-2]")
    ap.add_argument("--name", default="cache_faults")
    add_out(ap)
    args = ap.parse_args()
    from benchmarks.common import make_checkpoint
    from gpt2_onnx.models import BUNDLED

    with tempfile.TemporaryDirectory() as tmp:
        ck = BUNDLED if args.checkpoint == "bundled" else Path(args.checkpoint or Path(tmp) / "hf")
        if args.checkpoint is None:
            make_checkpoint(ck, seed=1, vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                            initializer_range=0.3, bos_token_id=0, eos_token_id=0)
        conc = [concurrent(ck, Path(tmp) / f"c{i}", args.procs, args.delay) for i in range(args.trials)]
        kill = [killed(ck, Path(tmp) / f"k{i}") for i in range(args.trials)]
    ok = [t for t in conc if t["ok"] == args.procs and t["same_output"] and t["exported"] == t["exports"] == 1
          and not t["temp_dirs"]]
    summary = {"checkpoint": args.checkpoint or "tiny", "procs": args.procs, "delay_s": args.delay,
               "trials": args.trials,
               "concurrent_runs_ok": sum(t["ok"] for t in conc), "concurrent_runs": args.procs * args.trials,
               "concurrent_trials_all_ok_one_export": len(ok),  # all exit 0, same output, one export made
               "exports_made_per_trial": sorted({t["exported"] for t in conc}),
               "errors": sorted({e for t in conc for e in t["errors"]}),
               "killed_reruns_ok": sum(k["rerun_ok"] for k in kill),
               "killed_trials_with_orphan": sum(k["orphans_after_kill"] > 0 for k in kill),
               "killed_temp_dirs_left_after_rerun": sum(k["temp_dirs_after_rerun"] for k in kill)}
    save_json(args.out, args.name, {"summary": summary, "concurrent": conc, "killed": kill})


if __name__ == "__main__":
    main()
