"""Connecting to Ray: a cluster address, RAY_ADDRESS (set by `ray job submit`), or a local Ray."""

from __future__ import annotations

import os
import socket

import ray

from dnc_ray.infra import console
from dnc_ray.infra.errors import ConfigError


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (else RAY_ADDRESS), or start a local Ray with `num_cpus` logical CPUs
    (a config's `ray:` section)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
    console.open_logs()  # a quiet `dnc`: Ray's logs go to files from here on
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    console.route_worker_output()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver prints one progress line per interval instead
    ctx.enable_operator_progress_bars = False


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast with a clear message when a host:port GCS address does not answer (ray.init waits minutes)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return  # "auto", ray://...: Ray resolves these itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}); is it running? "
            f"`ray status --address {address}` tells"
        ) from None
