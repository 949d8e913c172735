"""Batch jobs on Ray Data: `gpt2-onnx batch --replicas N` (gpt2_onnx.batch.execute calls run_batch).

Each actor is a gpt2_onnx.batch.BatchWorker: one AsyncEngine answering rows with the server's completion
service, as the job does without Ray. This module imports gpt2_onnx.batch, never the other way round at
import time (batch imports this module only when a job asks for replicas)."""

from __future__ import annotations

import math
from collections.abc import Callable

from gpt2_onnx.distributed.cluster import connect
from gpt2_onnx.server.options import actor_cpus


def run_batch(rows: list[str], on_rows: Callable[[list[str]], None], *, worker: dict, replicas: int,
              address: str | None, batch_size: int, cpus: float | None = None) -> None:
    """Ray Data map_batches over raw JSONL rows with a pool of `replicas` actors (gpt2_onnx.batch.BatchWorker,
    one engine each, `worker` its keyword arguments); on_rows gets each finished batch's output rows, in the
    driver, as they come."""
    import ray
    import ray.data

    from gpt2_onnx.batch import BatchWorker

    local = connect(address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
        ctx.print_on_execution_start = False
        threads = worker.get("threads") or 1
        ds = ray.data.from_items([{"row": r} for r in rows], override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
        out = ds.map_batches(BatchWorker, fn_constructor_kwargs={**worker, "threads": threads}, batch_size=batch_size,
                             compute=ray.data.ActorPoolStrategy(size=replicas), batch_format="numpy",
                             num_cpus=actor_cpus(threads, cpus))
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            on_rows([str(r) for r in batch["row"]])
    finally:
        if local:
            ray.shutdown()
