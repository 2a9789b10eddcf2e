"""The terminal shows the project's own lines; Ray's, DeepSpeed's and Transformers' logs go to files.

`dnc` (unless `--verbose` or DNC_VERBOSE=1) calls `quiet()` first: from then on this process's file
descriptors 1 and 2 (every Python logger and warning, Ray's C++ core worker, a local Ray's own processes)
write to a log file, and only `say` reaches the terminal. `logs_under(folder)` names the folder (the run's
output) and `init_ray` opens `<folder>/driver.log` there when Ray starts; Ray workers' output then goes to
`<folder>/workers.log`, except the project's own lines they print ("[train] step ...").
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from dnc_ray.infra import storage

VERBOSE_ENV = "DNC_VERBOSE"
OUR_LINE = re.compile(r"^\[(generate|train|pipeline|study|batch|serve|dnc)\] ")


class _Terminal:
    out: TextIO | None = None  # the terminal's stdout and stderr while quiet; None: print as usual
    err: TextIO | None = None
    early_log: str | None = None  # what fds 1 and 2 wrote before the log folder was opened
    folder: str | None = None  # where driver.log and workers.log go, once Ray starts
    workers: TextIO | None = None
    # pid -> the project lines it showed last: Ray Train echoes a worker's output twice, the echo of a few lines
    # coming after them all
    shown: dict[int, deque] = {}
    scope: str | None = None  # what this process works for, named in each line (a study's cell)
    lock = threading.Lock()


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextmanager
def scope(name: str | None) -> Iterator[None]:
    """Within it, each project line names `name` after its tag: "[generate] gsm8k/teacher: 8/16 rows ..."."""
    outer, _Terminal.scope = _Terminal.scope, name
    try:
        yield
    finally:
        _Terminal.scope = outer


def current_scope() -> str | None:
    return _Terminal.scope


def say(line: str, err: bool = False) -> None:
    """One of the project's lines, to the terminal (to stdout / stderr when the console is not quiet)."""
    if _Terminal.scope:
        line = OUR_LINE.sub(lambda tag: f"{tag.group(0)}{_Terminal.scope}: ", line, count=1)
    stream = (_Terminal.err if err else _Terminal.out) or (sys.stderr if err else sys.stdout)
    with _Terminal.lock:
        print(line, file=stream, flush=True)


def terminal() -> TextIO:
    """The stream `say` writes to (for a live progress bar)."""
    return _Terminal.out or sys.stdout


def quiet() -> None:
    """From here on, fds 1 and 2 write to a log file; the terminal keeps `say`'s lines and tracebacks."""
    if _Terminal.out is not None or not _own_streams():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    _Terminal.out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    _Terminal.err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    fd, _Terminal.early_log = tempfile.mkstemp(prefix="dnc-driver-", suffix=".log")
    _redirect(fd)
    os.close(fd)
    sys.excepthook = _traceback_to_terminal
    atexit.register(_close)


def logs_under(folder: str) -> None:
    """Where this command's logs go once Ray starts (a local folder; for a storage URI, a temporary one)."""
    if _Terminal.out is None:
        return
    local = storage.filesystem(folder)[1] if "://" not in folder else tempfile.mkdtemp(prefix="dnc-logs-")
    _Terminal.folder = local


def open_logs() -> None:
    """Called before Ray starts: fds 1 and 2 now append to <folder>/driver.log (earlier lines copied in)."""
    if _Terminal.out is None or _Terminal.folder is None or _Terminal.workers is not None:
        return
    os.makedirs(_Terminal.folder, exist_ok=True)
    driver = os.path.join(_Terminal.folder, "driver.log")
    sys.stdout.flush()
    sys.stderr.flush()
    with open(driver, "a", encoding="utf-8") as log:
        log.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} dnc {' '.join(sys.argv[1:])}\n")
        if _Terminal.early_log:
            with open(_Terminal.early_log, encoding="utf-8", errors="replace") as early:
                log.write(early.read())
    fd = os.open(driver, os.O_WRONLY | os.O_APPEND)
    _redirect(fd)
    os.close(fd)
    _remove_early_log()
    _Terminal.workers = open(os.path.join(_Terminal.folder, "workers.log"), "a", encoding="utf-8")
    say(f"[dnc] logs of Ray, DeepSpeed and Transformers: {_Terminal.folder}/driver.log and workers.log "
        f"(dnc --verbose shows them here)")


def route_worker_output() -> None:
    """Called once Ray is up: workers' output goes to workers.log; the project's own lines to the terminal."""
    if _Terminal.workers is None:
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher  # Ray's own printer

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("dnc_console")
    dispatcher.add_handler("dnc_console", _worker_lines)


def _worker_lines(batch: dict) -> None:
    if _Terminal.workers is None:  # closed at exit, while Ray shuts down
        return
    name = batch.get("actor_name") or batch.get("task_name") or "worker"
    ours = [line for line in batch.get("lines", []) if OUR_LINE.match(line)]
    with _Terminal.lock:
        _Terminal.workers.writelines(f"({name} pid={batch.get('pid')}) {line}\n" for line in batch.get("lines", []))
        _Terminal.workers.flush()
        shown = _Terminal.shown.setdefault(batch.get("pid"), deque(maxlen=64))
        for line in ours:
            if line not in shown:
                print(line, file=_Terminal.out, flush=True)
                shown.append(line)


def _own_streams() -> bool:
    """Python's stdout and stderr are the process's fds 1 and 2 (not captured already, as by pytest)."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def _redirect(fd: int) -> None:
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def _traceback_to_terminal(kind, value, tb) -> None:
    traceback.print_exception(kind, value, tb, file=sys.stderr)  # into the log as well
    sys.stderr.flush()
    traceback.print_exception(kind, value, tb, file=_Terminal.err)
    if _Terminal.folder and _Terminal.workers is not None:
        say(f"[dnc] the logs may tell more: {_Terminal.folder}/driver.log and workers.log", err=True)


def _remove_early_log() -> None:
    if _Terminal.early_log:
        os.unlink(_Terminal.early_log)
        _Terminal.early_log = None


def _close() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    _remove_early_log()
    if _Terminal.workers is not None:
        _Terminal.workers.close()
        _Terminal.workers = None
