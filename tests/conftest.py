from __future__ import annotations

from pathlib import Path

import pytest

from cbios.project import Project

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project() -> Project:
    return Project(REPO)


@pytest.fixture
def tmp_project(tmp_path: Path) -> Project:
    """A small project: a valid base profile, one overlay, two slot templates."""
    (tmp_path / "profiles").mkdir()
    (tmp_path / "overlays" / "base").mkdir(parents=True)
    for name in ("dhcp", "dns_master"):
        (tmp_path / "slot-templates" / name).mkdir(parents=True)
        (tmp_path / "slot-templates" / name / "slot.yaml").write_text("type: lxc-service\n")
    (tmp_path / "profiles" / "base.yaml").write_text(
        'version: "1.0"\n'
        "packages: [systemd, udev]\n"
        "overlays: [base]\n"
        "kernel:\n"
        "  modules: [fs/ext4]\n"
        "  cmdline: [quiet]\n"
    )
    return Project(tmp_path)
