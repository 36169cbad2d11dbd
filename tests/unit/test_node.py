"""Node-side code (cbios.node): the boot state block, commit, and `cbios status` output."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from cbios.node import bootenv, status
from cbios.profile import load_profile
from cbios.project import Project
from cbios.render import boot_files

NODE = Path(__file__).resolve().parents[2] / "cbios" / "node"


def test_node_code_uses_the_standard_library_only() -> None:
    for path in NODE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or name.startswith("cbios.node") or name == "__future__", (
                    f"{path.name} imports {name}")


def test_grubenv_round_trip_is_one_block() -> None:
    env = {"cbios_active": "root", "cbios_root_state": "new", "cbios_root_tries": "2",
           "cbios_fallback": "copy root could not be loaded (kernel, initrd or file system)"}
    data = bootenv.render(env)
    assert len(data) == bootenv.SIZE and data.startswith(bootenv.HEADER) and data.endswith(b"#")
    assert bootenv.parse(data) == env


def test_grubenv_reads_what_grub_editenv_writes(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    subprocess.run(["grub-editenv", str(path), "set", "cbios_active=spare", "cbios_spare_state=good"], check=True)
    assert bootenv.read(path) == {"cbios_active": "spare", "cbios_spare_state": "good"}
    bootenv.write(path, {**bootenv.read(path), "cbios_fallback": "x"})
    listed = subprocess.run(["grub-editenv", str(path), "list"], capture_output=True, text=True, check=True)
    assert listed.stdout.splitlines() == ["cbios_active=spare", "cbios_spare_state=good", "cbios_fallback=x"]


def test_grubenv_that_does_not_fit_is_refused() -> None:
    with pytest.raises(bootenv.BootEnvError, match="does not fit"):
        bootenv.render({"cbios_x": "y" * 2000})


def test_commit_marks_the_running_copy_good_and_next() -> None:
    env = {"cbios_active": "root", "cbios_root_state": "new", "cbios_root_tries": "1",
           "cbios_spare_state": "good"}
    assert bootenv.committed(env, "root") == {"cbios_active": "root", "cbios_root_state": "good",
                                              "cbios_spare_state": "good"}
    fell_back = {"cbios_active": "spare", "cbios_root_state": "bad", "cbios_spare_state": "good"}
    assert bootenv.committed(fell_back, "spare") == fell_back


@pytest.mark.parametrize(("cmdline", "copy"), [
    ("root=/dev/lvm/root ro cbios.copy=root quiet", "root"),
    ("BOOT_IMAGE=x cbios.copy=spare", "spare"),
    ("root=LABEL=cbios-root ro", None),
    ("cbios.copy=other", None),
])
def test_running_copy_from_the_kernel_command_line(cmdline: str, copy: str | None) -> None:
    assert bootenv.running_copy(cmdline) == copy


def test_status_text_names_copies_versions_and_the_last_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    versions = {"root": None, "root-spare": {"CBIOS_VERSION": "1.0.0", "CBIOS_PROFILE": "qemu-test"}}
    monkeypatch.setattr(status, "copy_release", lambda vg, lv: versions[lv])
    env = {"cbios_active": "spare", "cbios_root_state": "bad", "cbios_spare_state": "good",
           "cbios_fallback": "copy root could not be loaded (kernel, initrd or file system)"}
    own = {"CBIOS_PROFILE": "qemu-test", "CBIOS_VERSION": "1.0.0", "CBIOS_OBJECT_ID": "31000040010", "CBIOS_VG": "lvm"}
    st = status.gather(env, "spare", own)
    assert st["copies"]["root"]["version"] is None and st["copies"]["spare"]["running"]
    assert status.render_text(st).splitlines() == [
        "CBIOS qemu-test 1.0.0, node 31000040010",
        "copy   LV              version     state  tries",
        "root   lvm/root        unreadable  bad    -",
        "spare  lvm/root-spare  1.0.0       good   -      (running)",
        "next boot:     spare",
        "last fallback: copy root could not be loaded (kernel, initrd or file system)",
    ]


def test_rendered_grub_cfg_is_valid_grub_script(project: Project, tmp_path: Path) -> None:
    cfg = tmp_path / "grub.cfg"
    cfg.write_text(boot_files(project, load_profile(project, "qemu-test"))["grub.cfg"])
    proc = subprocess.run(["grub-script-check", str(cfg)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
