"""Beyond one machine: the OpenAI-compatible server as Ray Serve replicas, batch jobs on Ray Data.

Imported only when Ray is asked for (`gpt2-onnx serve --replicas N`, `gpt2-onnx batch --replicas N`,
a KubeRay RayService naming `gpt2_onnx.distributed:app_builder`): the runtime itself never imports ray,
and importing this package does not either (its modules import ray when they run).

- `serve`: the Ray Serve application (Ingress -> Replica), built by `build`/`app_builder`, run by
  `serve_forever`; each replica is a client of one AsyncEngine (`api`: its answers without HTTP).
- `data`: `run_batch`, a `gpt2-onnx batch` job on Ray Data (gpt2_onnx.batch.BatchWorker actors).
- `options`: ServeOptions, `actor_cpus`, `load_config`; `cluster`: `connect`.
"""

from gpt2_onnx.distributed.cluster import connect
from gpt2_onnx.distributed.data import run_batch
from gpt2_onnx.server.options import ServeOptions, actor_cpus, load_config
from gpt2_onnx.distributed.serve import (ACCEPTED, APP_NAME, REPLICA_HEADER, RETRIES, Forwarder, Ingress, Replica,
                                         app_builder, build, merge_metrics, serve_forever)

__all__ = ["ACCEPTED", "APP_NAME", "REPLICA_HEADER", "RETRIES", "Forwarder", "Ingress", "Replica", "ServeOptions",
           "actor_cpus", "app_builder", "build", "connect", "load_config", "merge_metrics", "run_batch",
           "serve_forever"]
