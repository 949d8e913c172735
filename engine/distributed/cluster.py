"""Joining a Ray cluster, or starting a local Ray instance that keeps to loopback."""

from __future__ import annotations

import os


def connect(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address`, or start a local Ray instance (True) that keeps to loopback:
    every Ray process listens on and talks to 127.0.0.1, usage statistics off."""
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # children: the node's address is 127.0.0.1
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return False
    if address is None:
        ray_constants.ENABLE_RAY_CLUSTER = False  # this process: a single-node instance on 127.0.0.1
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level="WARNING",
                 configure_logging=True)
        return True
    try:
        ray.init(address=address, logging_level="WARNING")
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot connect to the Ray cluster at {address!r} ({str(e).splitlines()[0][:200]}); "
                         "check --ray-address (host:port of the head node's GCS, or 'auto')") from None
    return False
