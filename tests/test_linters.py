"""Linters run as ordinary tests: a lint error fails `make test`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, check=False)


def test_ruff() -> None:
    proc = _run("ruff", "check", "cbios", "tests", "tasks.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy() -> None:
    proc = _run("mypy")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck() -> None:
    scripts = [p for p in (REPO / "initrd").rglob("*")
               if p.is_file() and (p.read_bytes().startswith(b"#!/bin/") or p.suffix == ".sh")]
    scripts += [p for p in (REPO / "overlays").rglob("*") if p.is_file() and p.suffix != ".j2"
                and (p.read_bytes().startswith(b"#!/bin/") or p.suffix == ".sh")]
    assert scripts
    proc = subprocess.run(["shellcheck", "-x", *map(str, scripts)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
