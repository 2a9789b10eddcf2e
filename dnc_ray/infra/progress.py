"""Progress of a long run: a live bar on an interactive terminal, else a plain line per interval
(rows done / total, rows/s, errors so far, ETA)."""

from __future__ import annotations

import time

from tqdm import tqdm

from dnc_ray.infra import console


class Progress:
    def __init__(self, label: str, total: int, interval_s: float = 10.0):
        self.label, self.total, self.interval_s = label, total, interval_s
        self.done = self.errors = 0
        self.started = self._last_print = time.monotonic()
        terminal = console.terminal()
        self.bar = tqdm(total=total, desc=f"[{label}]", unit="rows", file=terminal) if terminal.isatty() else None

    def update(self, rows: int, errors: int) -> None:
        self.done += rows
        self.errors += errors
        if self.bar is not None:
            self.bar.set_postfix_str(f"errors {self.errors}", refresh=False)
            self.bar.update(rows)
            return
        now = time.monotonic()
        if now - self._last_print >= self.interval_s or self.done >= self.total:
            self._last_print = now
            console.say(self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def rows_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        pct = 100 * self.done / self.total if self.total else 100.0
        rate = self.rows_per_s
        eta = f"{(self.total - self.done) / rate:.0f}s" if rate > 0 else "?"
        return (
            f"[{self.label}] {self.done}/{self.total} rows ({pct:.0f}%) | {rate:.2f} rows/s | "
            f"errors {self.errors} | elapsed {self.elapsed_s:.0f}s | eta {eta}"
        )
