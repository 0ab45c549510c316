"""Errors a user can act on: each names where the problem is and what to do about it."""

from __future__ import annotations

from typing import Any

ECHO_CHARS = 80  # longest user value quoted whole in an error line


def echo(value: Any) -> str:
    """repr of a user's value for an error line, shortened: a 10 MB value must not become the line."""
    text = repr(value)
    if len(text) <= ECHO_CHARS:
        return text
    return f"{text[: ECHO_CHARS - 1]}… ({len(text)} characters)"


class ReportgenError(Exception):
    """A failure reported to the user as one clear message (no traceback)."""


class SpecError(ReportgenError):
    """One or more problems in a spec file, each located at file:line:col."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class WeightsUnavailableError(ReportgenError):
    """Pretrained weights are neither cached nor downloadable (offline machine)."""


class NothingDecodedError(ReportgenError):
    """None of the images chosen for some work could be decoded. A shard of a request's images that gets
    it holds no results (the host merges the other shards); the whole request getting it is the error."""
