"""Connecting to Ray: a cluster address, RAY_ADDRESS (set by `ray job submit`), or a local Ray."""

from __future__ import annotations

import os

import ray

from dnc_ray.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Join the configured cluster, or start a local Ray with cfg.num_cpus logical CPUs."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver prints one progress line per interval instead
    ctx.enable_operator_progress_bars = False
