"""One driver per output: a lease file, `<output>/lease.json`, that the driver holds while it runs.

The lease names its owner (a random id), host, pid and the time of its last heartbeat; the driver
rewrites it every `refresh_s` (atomically, through infra/storage, so on local disk, s3:// or gs://
alike). Another driver is refused (LeaseHeld, one line) while the lease is alive. It is free when:
- it is missing, unreadable, or released (deleted) by a driver that ended, killed or not by an error;
- its heartbeat is older than `ttl_s` (the holder died on another machine, or hangs); or
- its holder ran on this machine (same host name and pid namespace) and that process is gone
  (killed): then the next driver takes over at once, without waiting for the ttl.

Object storage has no compare-and-swap here: taking a free lease is write, wait `settle_s`, read
back, and two drivers that start within that moment of each other can both read back their own
write. Each heartbeat therefore reads the lease first: a driver that finds another owner in it
stops (LeaseLost) before it writes any more rows or run.json, at most `refresh_s` later. Rows
both drivers wrote in the meantime are the same keys with equal content (the latest part wins):
nothing is lost or corrupted, some requests are paid twice. The same holds on local disk.
Heartbeat ages compare wall clocks of different machines: keep them within a few seconds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from dnc_ray.infra import storage

LEASE_FILE = "lease.json"
TTL_S = 60.0  # a heartbeat older than this frees the lease
REFRESH_S = 15.0  # how often the holder rewrites (and re-reads) it


class LeaseError(Exception):
    """The output is driven by another driver (a one-line message)."""


class LeaseHeld(LeaseError):
    """Another driver holds a live lease on the output: this one does not start."""


class LeaseLost(LeaseError):
    """Another driver took the lease over: this one stops writing."""


def _host() -> str:
    """This machine, as far as pids mean the same thing: the host name and the pid namespace."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{namespace}" if namespace else socket.gethostname()


def _started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) on Linux: a pid reused later has another one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]  # a zombie is dead; field 22 (starttime) of stat


def _pid_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    if os.path.exists("/proc/self/stat"):
        now = _started(pid)
        return now is not None and (started is None or now == started)
    return True


class Lease:
    """`with Lease(output):` holds the output's lease, refreshed by a daemon thread; `check()` before writes."""

    def __init__(self, output: str, ttl_s: float = TTL_S, refresh_s: float = REFRESH_S, settle_s: float = 0.5):
        self.output = output
        self.uri = storage.join(output, LEASE_FILE)
        self.ttl_s, self.refresh_s, self.settle_s = ttl_s, refresh_s, settle_s
        self.owner = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat_at = 0.0

    # -- reading ---------------------------------------------------------------------------------
    def holder(self) -> dict | None:
        """The lease as written, or None when there is none (or it cannot be read: it is then free)."""
        try:
            held = json.loads(storage.read_text(self.uri))
        except (FileNotFoundError, ValueError):
            return None
        needed = {"owner", "host", "pid", "heartbeat"}
        return held if isinstance(held, dict) and needed <= set(held) else None

    def alive(self, held: dict) -> bool:
        if time.time() - float(held["heartbeat"]) > float(held.get("ttl_s", self.ttl_s)):
            return False
        if held["host"] == _host():
            return _pid_alive(int(held["pid"]), held.get("started"))
        return True

    def refuse_if_held(self) -> None:
        """Raise LeaseHeld when another driver holds a live lease; reads only."""
        held = self.holder()
        if held is not None and held["owner"] != self.owner and self.alive(held):
            age = time.time() - float(held["heartbeat"])
            raise LeaseHeld(
                f"output {self.output} is in use by another driver (pid {held['pid']} on {held['host'].split('/')[0]}, "
                f"heartbeat {age:.0f}s ago); wait for it to end, or, if it is dead, for its lease to expire "
                f"({held.get('ttl_s', self.ttl_s):g}s after its last heartbeat) or delete {self.uri}"
            )

    # -- holding ---------------------------------------------------------------------------------
    def acquire(self) -> None:
        self.refuse_if_held()
        self._write()
        time.sleep(self.settle_s)  # a driver that took it at the same moment: the later write wins ...
        if (self.holder() or {}).get("owner") != self.owner:  # ... and the other one sees it here
            self.refuse_if_held()
            raise LeaseHeld(f"output {self.output}: another driver took the lease at the same moment; try again")
        self._thread = threading.Thread(target=self._heartbeat, name="dnc-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise LeaseLost when another driver took over (seen by the last heartbeat) or no heartbeat got through
        for a whole ttl (another driver may have taken over since)."""
        if self.lost is None and self._thread is not None and time.time() - self._beat_at > self.ttl_s:
            self.lost = f"the lease on {self.output} could not be refreshed for {self.ttl_s:g}s"
        if self.lost is not None:
            raise LeaseLost(f"{self.lost}: this driver stopped writing; the other driver (or a re-run) goes on")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost is None and (self.holder() or {}).get("owner") == self.owner:
            storage.delete(self.uri)

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _write(self) -> None:
        now = time.time()
        storage.write_text(self.uri, json.dumps({
            "owner": self.owner, "host": _host(), "pid": os.getpid(), "started": _started(os.getpid()),
            "heartbeat": now, "heartbeat_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "ttl_s": self.ttl_s,
        }))
        self._beat_at = now

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                held = self.holder()
                if held is not None and held["owner"] != self.owner:
                    self.lost = (f"another driver (pid {held['pid']} on {held['host'].split('/')[0]}) took over "
                                 f"the lease on {self.output}")
                    return
                self._write()
            except OSError:
                continue  # storage hiccup: try again next beat; check() gives up after a ttl without one
