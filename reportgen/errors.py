"""Errors a user can act on: each names where the problem is and what to do about it."""

from __future__ import annotations


class ReportgenError(Exception):
    """A failure reported to the user as one clear message (no traceback)."""


class SpecError(ReportgenError):
    """One or more problems in a spec file, each located at file:line:col."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class WeightsUnavailableError(ReportgenError):
    """Pretrained weights are neither cached nor downloadable (offline machine)."""
