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


# What `cbios` exits with, for `--help`, the man page and the README (each checked against it).
EXIT_CODES = {
    0: "done",
    1: "a step failed: mkosi, QEMU, dnsmasq, or a boot that did not get ready (its log is named)",
    2: "bad input: a profile, an argument, a bundle, an image; nothing was changed",
    130: "interrupted (Ctrl-C)",
}
