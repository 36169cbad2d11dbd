"""Running the node's tools for CB-Executor: bounded, and a failure is one line (Failed)."""

from __future__ import annotations

import subprocess

from cbios.node.wire import Failed


def run(argv: list[str], *, timeout: float = 120, input: bytes | None = None) -> str:
    """ARGV's standard output; Failed with its last line of errors, or when it outlives TIMEOUT."""
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise Failed(f"{argv[0]}: no answer within {timeout:.0f} s") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
        raise Failed(f"{' '.join(argv[:3])}: {err[-1] if err else f'exit status {proc.returncode}'}")
    return proc.stdout.decode(errors="replace")
