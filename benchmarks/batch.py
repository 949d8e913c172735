"""gpt2-onnx batch's throughput: in this process (1 engine x 2 threads) vs Ray Data (2 actors x 1 thread).

    python -m benchmarks.batch [--rows 800] [--max-tokens 64] [--batch-size 64] [--name batch]

The same rows (greedy, 4-token prompts of distinct ids, the bundled model) through BatchWorker in this
process and through gpt2_onnx.distributed.data.run_batch on a local Ray instance (2 CPUs, loopback), timed
from the start (model load and Ray's start included) to each batch's arrival in the driver. Reports
the time to the first batch, the completion tokens/s from the time every engine has answered a batch
(the steady state) and overall; the answers of both must be the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from benchmarks.common import add_out, machine, save_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=800)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--name", default="batch")
    add_out(ap)
    args = ap.parse_args()
    rows = [json.dumps({"id": i, "prompt": [1 + i % 4000, 7, 9, 11], "max_tokens": args.max_tokens,
                        "temperature": 0}) for i in range(args.rows)]
    result = {"command": "python -m benchmarks.batch " + " ".join(sys.argv[1:]), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_before": os.getloadavg(), "rows": args.rows,
              "max_tokens": args.max_tokens, "batch_size": args.batch_size}
    answers = {}
    for mode in ("here, 1 engine x 2 threads", "Ray Data, 2 actors x 1 thread"):
        times, tokens, out = [], [], {}

        def on_rows(lines: list[str]) -> None:
            times.append(time.perf_counter())
            got = [json.loads(line) for line in lines]
            tokens.append(sum(r["body"]["usage"]["completion_tokens"] for r in got))
            out.update({r["id"]: r["body"]["choices"][0]["text"] for r in got})

        t0 = time.perf_counter()
        if mode.startswith("here"):
            from gpt2_onnx.batch import BatchWorker

            w = BatchWorker(None, provider="cpu", threads=2)
            for s in range(0, len(rows), args.batch_size):
                on_rows([str(r) for r in w({"row": np.array(rows[s : s + args.batch_size], dtype=object)})["row"]])
            w.close()
        else:
            from gpt2_onnx.distributed.data import run_batch

            run_batch(rows, on_rows, worker=dict(model=None, provider="cpu", threads=1, max_batch=16,
                                                 prefix_cache_mb=512), replicas=2, address=None,
                      batch_size=args.batch_size)
        k = 1 if mode.startswith("here") else 2  # engines: from the time each has answered a batch
        first, last = times[0], times[-1]
        result[mode] = {"first_batch_s": first - t0, "total_s": last - t0,
                        "tok_s_after_each_engines_first_batch": sum(tokens[k:]) / (last - times[k - 1]),
                        "tok_s_overall": sum(tokens) / (last - t0)}
        answers[mode] = out
        print(mode, {k: round(v, 1) for k, v in result[mode].items()}, file=sys.stderr, flush=True)
    a, b = answers.values()
    result["identical_answers"] = a == b
    result["load_average_after"] = os.getloadavg()
    save_json(args.out, args.name, result)


if __name__ == "__main__":
    main()
