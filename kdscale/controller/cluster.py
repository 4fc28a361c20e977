"""Start (or join) the Ray cluster of a run, and always shut it down.

A local cluster gets a private temp dir (short path: Ray's socket paths are length-limited), a small object
store and enough logical CPUs for every actor (actors declare num_cpus=0 and set their torch threads
themselves, so a 2-core laptop can host a teacher and two student ranks).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kdscale.config.schema import KDConfig
from kdscale.observability.logging import get_logger


@contextlib.contextmanager
def ray_cluster(cfg: KDConfig, run_dir: Path) -> Iterator[None]:
    """Connect to ``ray.address`` or start a local cluster; shut down (and clean the temp dir) on exit."""
    import ray

    if ray.is_initialized():  # an enclosing session (tests, notebooks) owns the cluster
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local, loopback-only cluster
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    log = get_logger("kdscale.cluster")
    own_temp = None
    if cfg.ray.address is not None:
        log.info(f"joining the Ray cluster at {cfg.ray.address}")
        ray.init(address=cfg.ray.address, log_to_driver=True)
    else:
        temp_dir = cfg.ray.temp_dir or (own_temp := tempfile.mkdtemp(prefix="kdray-", dir="/tmp"))
        num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, cfg.student.world_size + cfg.teacher.num_replicas)
        log.info(f"starting a local Ray cluster ({num_cpus} CPUs, object store {cfg.ray.object_store_memory_mb} MiB)")
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=cfg.ray.object_store_memory_mb * 1024 * 1024,
            _temp_dir=temp_dir,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
        )
    try:
        yield
    finally:
        ray.shutdown()
        if own_temp:
            shutil.rmtree(own_temp, ignore_errors=True)
