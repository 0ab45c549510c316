"""Progress on a terminal (rich bars: done, rate, ETA) and plain log lines for cron (not a TTY)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("reportgen")


class Progress:
    def __init__(self, quiet: bool = False, tty: bool | None = None):
        self.quiet = quiet
        self.tty = sys.stderr.isatty() if tty is None else tty

    def info(self, message: str) -> None:
        if not self.quiet:
            log.info(message)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """Yields advance(n). Bars on a TTY; otherwise a start line, ~10 % steps, and an end line."""
        if self.quiet or total <= 0:
            yield lambda n: None
            return
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            rate = TextColumn("{task.fields[rate]}")
            with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), rate,
                     TimeRemainingColumn(), transient=False) as bar:
                task = bar.add_task(description, total=total, rate="")
                t0 = time.perf_counter()

                def advance_bar(n: int) -> None:
                    bar.advance(task, n)
                    done = bar.tasks[0].completed
                    bar.update(task, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.2f}/s")

                yield advance_bar
            return
        t0, done, next_report = time.perf_counter(), 0, max(1, total // 10)
        log.info("start %s: %d items", description, total)

        def advance(n: int) -> None:
            nonlocal done, next_report
            done += n
            if done >= next_report or done == total:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                eta = (total - done) / rate if rate else 0.0
                log.info("%s: %d/%d (%.2f/s, eta %.0fs)", description, done, total, rate, eta)
                next_report = done + max(1, total // 10)

        yield advance
        log.info("done %s in %.1fs", description, time.perf_counter() - t0)
