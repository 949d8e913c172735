"""Where greedy answers of ours and llama-server part: the first differing token and our top-2 margin there.

    python -m benchmarks.divergence RESULTS.json [--checkpoint DIR]

RESULTS.json: written by `python -m benchmarks.server_load --models 124m --llama-server --keep-answers`.
For each request whose answer differs, our greedy run of the same prompt with logprobs=2 gives the
token where the texts part and the log-probability gap between our two most likely tokens there: a gap
near zero is a near tie that rounding in either implementation can decide either way.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import checkpoint
from benchmarks.server_load import prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--checkpoint", default=None, help="HF GPT-2 folder [default: random-init GPT2Config()]")
    args = ap.parse_args()
    from gpt2_onnx import Engine

    res = json.loads(open(args.results).read())
    eng = Engine.load(str(checkpoint(args.checkpoint)), provider="cpu")
    vocab = eng.config.vocab_size
    for ours, theirs in zip(res["throughput"]["124m"]["after"], res["throughput"]["124m"]["llama-server"]):
        if ours.get("answers") is None:
            raise SystemExit(f"{args.results} holds no answers: run server_load with --keep-answers")
        jobs = prompts(vocab, ours["requests"])
        differing = [i for i, (a, b) in enumerate(zip(ours["answers"], theirs["answers"])) if a != b]
        print(f"{ours['clients']} clients: {len(differing)} of {ours['requests']} answers differ")
        for i in differing:
            r = eng.generate_batch([jobs[i]], max_new_tokens=res["max_tokens"], logprobs=2)[0]
            k = next((k for k in range(1, len(r.token_ids) + 1)
                     if not theirs["answers"][i].startswith(eng.tokenizer.decode(r.token_ids[:k]))), None)
            if k is None:  # ours is a prefix of theirs: they differ only past our last token
                print(f"  request {i}: our whole answer is a prefix of llama-server's")
                continue
            (a, la), (b, lb) = r.top_logprobs[k - 1]
            print(f"  request {i}: first differing token {k} of {len(r.token_ids)}; ours {a} ({la:.6f}), "
                  f"runner-up {b} ({lb:.6f}): gap {la - lb:.2e} nats")


if __name__ == "__main__":
    main()
