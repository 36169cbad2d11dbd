"""Errors a person can act on: one line, no traceback, exit status 2."""

from __future__ import annotations


class CbiosError(Exception):
    """A failure caused by input (a profile, an image, a request): exit status 2."""

    status = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ProfileError(CbiosError):
    """One or more problems in a profile; each line names file, line and key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class StepError(CbiosError):
    """A build or boot step failed; names the step and the reason (exit status 1)."""

    status = 1

    def __init__(self, step: str, reason: str, *, hint: str | None = None) -> None:
        super().__init__(f"{step}: {reason}", hint=hint)
        self.step = step
        self.reason = reason
