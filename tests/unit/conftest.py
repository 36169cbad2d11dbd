from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbios import qemu

FAKE_QEMU = Path(__file__).parent / "fake_qemu.py"


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """fake_qemu.py as QEMU on PATH; the file its argv is recorded in."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / qemu.QEMU).symlink_to(FAKE_QEMU)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    argv_file = tmp_path / "argv"
    monkeypatch.setenv("FAKE_QEMU_ARGV", str(argv_file))
    return argv_file
