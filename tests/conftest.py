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
    """A small project: a valid base profile, one overlay, three slot templates."""
    (tmp_path / "profiles").mkdir()
    (tmp_path / "overlays" / "base").mkdir(parents=True)
    for name in ("cb-manager", "dhcp", "dns_master"):
        template = tmp_path / "slot-templates" / name
        template.mkdir(parents=True)
        dhcp = 'address: required\nparams: {range: {type: ipv4-range, default: ""}}\n'
        (template / "slot.yaml").write_text(f'type: lxc-service\nversion: "1.0"\ndescription: {name}\n'
                                            + (dhcp if name == "dhcp" else ""))
        (template / "run").write_text("#!/bin/sh\n")
        (template / "health").write_text("true\n")
    (tmp_path / "profiles" / "base.yaml").write_text(
        'version: "1.0"\n'
        "packages: [systemd, udev]\n"
        "overlays: [base]\n"
        "kernel:\n"
        "  modules: [fs/ext4]\n"
        "  cmdline: [quiet]\n"
    )
    return Project(tmp_path)
