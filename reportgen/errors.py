"""Errors a user can act on: each names where the problem is and what to do about it."""

from __future__ import annotations

import difflib
from typing import Any

ECHO_CHARS = 80  # longest user value quoted whole in an error line


def echo(value: Any) -> str:
    """repr of a user's value for an error line, shortened: a 10 MB value must not become the line."""
    text = repr(value)
    if len(text) <= ECHO_CHARS:
        return text
    return f"{text[: ECHO_CHARS - 1]}… ({len(text)} characters)"


def suggest(word: str, choices: list[str]) -> str:
    """"did you mean 'x'?" for the closest of `choices`, else the known names ("" when there are none):
    the hint of every error about an unknown name (spec keys, section types, models, thresholds)."""
    # a long word is no typo of a short name (and would make the comparison slow)
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6) if len(str(word)) < 100 else []
    if close or not choices:
        return f"did you mean {echo(close[0])}?" if close else ""
    names = [c if len(c) <= ECHO_CHARS else echo(c) for c in choices[:20]]  # the spec's own keys may be long
    return f"known: {', '.join(names)}" + (f" and {len(choices) - 20} more" if len(choices) > 20 else "")


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
