"""Rendering: the mkosi configuration of qemu-test against golden files, and overlays."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbios.errors import StepError
from cbios.profile import load_profile
from cbios.project import Project
from cbios.render import boot_files, mkosi_configs, network_files, render_overlays, slot_image_configs

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name", ["qemu-test", "service-node"])
def test_mkosi_configuration_matches_golden_files(project: Project, name: str) -> None:
    """Regenerate with CBIOS_UPDATE_GOLDEN=1 after a deliberate change, and review the diff."""
    profile = load_profile(project, name)
    configs = {**mkosi_configs(project, profile), "boot": boot_files(project, profile),
               "network": network_files(project, profile),
               **{f"slot-{k}": v for k, v in slot_image_configs(project, profile).items()}}
    for image, files in configs.items():
        for rel, text in files.items():
            golden = GOLDEN / name / image / rel
            if os.environ.get("CBIOS_UPDATE_GOLDEN"):
                golden.parent.mkdir(parents=True, exist_ok=True)
                golden.write_text(text)
            assert text == golden.read_text(), f"{golden} differs"


def test_rendered_sources_come_from_the_profile_mirror_only(project: Project) -> None:
    configs = mkosi_configs(project, load_profile(project, "qemu-test"))
    sources = configs["root"]["mkosi.pkgmngr/etc/apt/sources.list.d/mkosi.sources"]
    suites = [line for line in sources.splitlines() if line.startswith("Suites:")]
    assert suites == ["Suites: bookworm bookworm-updates", "Suites: bookworm-security"]
    assert "URIs: http://deb.debian.org/debian\n" in sources


def test_module_trimming_only_when_the_profile_asks(project: Project) -> None:
    base = mkosi_configs(project, load_profile(project, "base"))["root"]["mkosi.conf"]
    test = mkosi_configs(project, load_profile(project, "qemu-test"))["root"]["mkosi.conf"]
    assert "KernelModulesExclude" not in base
    assert "KernelModulesExclude=.*\nKernelModulesInclude=\n    drivers/block/virtio_blk\n" in test


def _overlay(project: Project, name: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = project.overlays / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_overlays_render_templates_copy_files_and_keep_order(tmp_project: Project, tmp_path: Path) -> None:
    _overlay(tmp_project, "base", {"etc/motd": "base\n", "etc/release.j2": "{{ profile.name }} {{ profile.version }}\n",
                                   "usr/bin/tool": "#!/bin/sh\n"})
    (tmp_project.overlays / "base" / "usr/bin/tool").chmod(0o755)
    os.symlink("/dev/null", tmp_project.overlays / "base" / "etc/masked.service")
    _overlay(tmp_project, "extra", {"etc/motd": "extra wins\n"})
    (tmp_project.profiles / "leaf.yaml").write_text('extends: base\nversion: "3.1"\noverlays: [extra]\n')
    dest = tmp_path / "out"
    render_overlays(tmp_project, load_profile(tmp_project, "leaf"), dest)
    assert (dest / "etc/release").read_text() == "leaf 3.1\n"
    assert not (dest / "etc/release.j2").exists()
    assert (dest / "etc/motd").read_text() == "extra wins\n"
    assert os.readlink(dest / "etc/masked.service") == "/dev/null"
    assert os.access(dest / "usr/bin/tool", os.X_OK)


def test_overlay_template_typo_is_an_error_naming_the_file(tmp_project: Project, tmp_path: Path) -> None:
    _overlay(tmp_project, "base", {"etc/x.j2": "{{ profile.nmae }}\n"})
    (tmp_project.profiles / "leaf.yaml").write_text('extends: base\n')
    with pytest.raises(StepError) as err:
        render_overlays(tmp_project, load_profile(tmp_project, "leaf"), tmp_path / "out")
    assert "overlays/base/etc/x.j2" in str(err.value)
    assert "nmae" in str(err.value)


def test_the_disk_layout_is_data_the_manifest_signs(project: Project) -> None:
    """What the flasher reads of the node's disk: numbers and names only (no shell to source)."""
    from cbios.render import disk_layout

    layout = disk_layout(project, load_profile(project, "qemu-test"))
    assert (layout["object_id"], layout["vg"], layout["tries"]) == ("31000040010", "lvm", 2)
    assert layout["root_size"] == 640 << 20 and layout["var_size"] == 256 << 20
    volumes = {v["name"]: v for v in layout["slot_volumes"]}
    assert volumes["slot2-0"] == {"name": "slot2-0", "size": 16 << 20, "template": "dhcp", "fill": "seed"}
    assert volumes["slot5-0"]["fill"] == "image" and volumes["slot5-0"]["size"] == 256 << 20
    assert all(isinstance(v["size"], int) for v in volumes.values())
