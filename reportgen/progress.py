"""Progress of every pass: bars on a terminal (items done, rate, ETA), structured log lines for cron.

On a TTY each pass gets a rich bar on stderr (stdout stays for the command's own output). Without a TTY
(cron, CI, a pipe) each pass logs a start line, about one line per 10 % and an end line, as logfmt
`key=value` pairs after the logger's timestamp, e.g.

    progress task="ascent vgg keras-example" done=16 total=48 pct=33 rate=2.10/s eta=15s

`--quiet` silences both. Several passes may run at once (cluster workers): `board()` shows one bar
per pass, each advanced as its pieces finish.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("reportgen")

Advance = Callable[[int], None]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _LogTask:
    """One pass reported as log lines: start, ~every 10 %, done."""

    def __init__(self, description: str, total: int):
        self.description, self.total = description, total
        self.t0, self.done, self.next_report = time.perf_counter(), 0, max(1, total // 10)
        self.closed = False
        log.info("start task=%s total=%d", _quote(description), total)

    def advance(self, n: int) -> None:
        self.done += n
        if self.done >= self.next_report or self.done >= self.total:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0.0
            log.info(
                "progress task=%s done=%d total=%d pct=%d rate=%.2f/s eta=%.0fs",
                _quote(self.description),
                self.done,
                self.total,
                100 * self.done // max(self.total, 1),
                rate,
                max(eta, 0.0),
            )
            self.next_report = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        seconds = time.perf_counter() - self.t0
        log.info(
            "done task=%s items=%d seconds=%.1f rate=%.2f/s",
            _quote(self.description),
            self.done,
            seconds,
            self.done / max(seconds, 1e-9),
        )


class Board:
    """A set of concurrently running passes; `add` returns the pass's advance(n)."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self._bar: Any = None
        self._logs: list[_LogTask] = []

    def __enter__(self) -> Board:
        if not self.progress.quiet and self.progress.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self._logs:
            task.close()
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def add(self, description: str, total: int) -> Advance:
        if self.progress.quiet or total <= 0:
            return lambda n: None
        if self._bar is None:
            task = _LogTask(description, total)
            self._logs.append(task)

            def advance_log(n: int) -> None:
                task.advance(n)
                if task.done >= task.total:
                    task.close()

            return advance_log
        bar = self._bar
        task_id = bar.add_task(description, total=total, rate="")
        t0 = time.perf_counter()

        def advance_bar(n: int) -> None:
            bar.advance(task_id, n)
            done = next(t for t in bar.tasks if t.id == task_id).completed
            bar.update(task_id, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.2f}/s")

        return advance_bar


class Progress:
    def __init__(self, quiet: bool = False, tty: bool | None = None):
        self.quiet = quiet
        self.tty = sys.stderr.isatty() if tty is None else tty

    def info(self, message: str) -> None:
        if not self.quiet:
            log.info(message)

    def board(self) -> Board:
        """Several passes at once (e.g. on cluster workers), one bar or log stream each."""
        return Board(self)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        """Yields advance(n) for one pass of `total` items."""
        with self.board() as board:
            yield board.add(description, total)
