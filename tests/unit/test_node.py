"""Node-side code (cbios.node): the boot state block, commit, and `cbios status` output."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbios.node.boot import bootenv, status
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
        "booted from:   disk",
        "next boot:     spare",
        "last fallback: copy root could not be loaded (kernel, initrd or file system)",
        "last failure:  none",
        "corruption:    none",
    ]


def test_status_shows_the_last_flash_from_the_receipt_the_flasher_kept(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status, "copy_release", lambda vg, lv: None)
    grubenv = tmp_path / "grub" / "grubenv"
    grubenv.parent.mkdir()
    assert bootenv.flash_receipt(grubenv) is None
    (grubenv.parent / bootenv.FLASH_RECEIPT).write_text("{not json")
    assert bootenv.flash_receipt(grubenv) is None
    (grubenv.parent / bootenv.FLASH_RECEIPT).write_text(json.dumps(
        {"result": "FLASHED", "mode": "install", "profile": "qemu-test", "version": "1.0.0", "reason": "",
         "finished": "2026-12-05T15:00:00Z", "bytes_received": 5, "kernel": "6.1"}))
    st = status.gather({"cbios_active": "root"}, "root", {"CBIOS_VG": "lvm"}, receipt=bootenv.flash_receipt(grubenv))
    assert st["last_flash"]["bytes_received"] == 5 and "kernel" not in st["last_flash"]
    assert "last flash:    FLASHED install qemu-test 1.0.0 at 2026-12-05T15:00:00Z" in status.render_text(st)


def test_rendered_grub_cfg_is_valid_grub_script(project: Project, tmp_path: Path) -> None:
    cfg = tmp_path / "grub.cfg"
    cfg.write_text(boot_files(project, load_profile(project, "qemu-test"))["grub.cfg"])
    proc = subprocess.run(["grub-script-check", str(cfg)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


LIB_SH = Path(__file__).resolve().parents[2] / "initrd/tree/usr/lib/cbios/lib.sh"


def _initrd_shell(grubenv: Path, script: str) -> str:
    """SCRIPT run by bash with the initrd's lib.sh, the boot state GRUBENV loaded."""
    proc = subprocess.run(["bash", "-c", f'set -eu; . "{LIB_SH}"; env_load "{grubenv}"; {script}'],
                          capture_output=True, text=True, check=True)
    return proc.stdout


def _grubenv(tmp_path: Path, *assignments: str) -> Path:
    path = tmp_path / "grubenv"
    subprocess.run(["grub-editenv", str(path), "create"], check=True)
    subprocess.run(["grub-editenv", str(path), "set", *assignments], check=True)
    return path


@pytest.mark.parametrize(("state", "chosen", "after"), [
    # A new copy spends a try; with none left it is bad and the other copy boots (as grub.cfg).
    (["cbios_active=root", "cbios_root_state=new", "cbios_root_tries=2", "cbios_spare_state=good"],
     "root", {"cbios_root_tries": "1", "cbios_root_state": "new"}),
    (["cbios_active=spare", "cbios_spare_state=new", "cbios_spare_tries=0", "cbios_root_state=good"],
     "root", {"cbios_spare_state": "bad", "cbios_active": "root",
              "cbios_fallback": "copy spare did not become ready in its tries"}),
    (["cbios_active=spare", "cbios_spare_state=good", "cbios_root_state=bad"], "spare", {}),
    ([], "root", {}),
])
def test_netboot_spends_tries_and_falls_back_as_grub_does(tmp_path: Path, state: list[str], chosen: str,
                                                         after: dict[str, str]) -> None:
    path = _grubenv(tmp_path, "cbios_installed=qemu-test 1.0.0", *state)
    before = bootenv.read(path)
    out = _initrd_shell(path, 'spend_try >/dev/null; echo "$CHOSEN"')
    assert out.strip() == chosen
    assert path.stat().st_size == bootenv.SIZE  # rewritten in place, GRUB's size
    assert bootenv.read(path) == {**before, **after}  # the Python reader agrees with the shell writer
    listed = subprocess.run(["grub-editenv", str(path), "list"], capture_output=True, text=True, check=True).stdout
    assert "cbios_installed=qemu-test 1.0.0" in listed.splitlines()  # and so does GRUB's own tool


def test_initrd_marks_a_copy_that_cannot_be_loaded_bad(tmp_path: Path) -> None:
    path = _grubenv(tmp_path, "cbios_active=root", "cbios_root_state=good", "cbios_spare_state=good")
    _initrd_shell(path, 'mark_bad root "copy root could not be loaded (file system)"')
    env = bootenv.read(path)
    assert (env["cbios_active"], env["cbios_root_state"]) == ("spare", "bad")
    assert env["cbios_fallback"] == "copy root could not be loaded (file system)"


FULL_STATE = {"cbios_failure": "copy spare (1.2.3): " + "x" * 140, "cbios_fallback": "y" * 100,
              "cbios_refused": "1.0.1 1.0.2 1.0.3 1.0.4", "cbios_active": "spare", "cbios_root_state": "good",
              "cbios_root_verity": "a" * 64 + ":26422", "cbios_spare_state": "new", "cbios_spare_tries": "3",
              "cbios_spare_verity": "b" * 64 + ":26422", "cbios_corrupt": "z" * 90}


def _first_sector(data: bytes) -> dict[str, str]:
    """The keys a torn write could leave new while the rest is old: the whole lines in the first sector."""
    head = data[:bootenv.SECTOR].rsplit(b"\n", 1)[0].decode()
    return dict(line.split("=", 1) for line in head.splitlines()[1:])


def test_a_write_torn_between_sectors_keeps_the_state_keys_together(tmp_path: Path) -> None:
    data = bootenv.render(FULL_STATE)
    state = [k for k in bootenv.STATE_KEYS if k in FULL_STATE]
    first = _first_sector(data)
    assert list(first)[:len(state)] == state and all(first[k] == FULL_STATE[k] for k in state)
    # The initrd's writer: the same order, the same first sector.
    path = _grubenv(tmp_path, *(f"{k}={v}" for k, v in FULL_STATE.items()))
    _initrd_shell(path, "env_save")
    written = path.read_bytes()
    assert _first_sector(written) == _first_sector(data) and bootenv.read(path) == FULL_STATE
    listed = subprocess.run(["grub-editenv", str(path), "list"], capture_output=True, text=True, check=True).stdout
    assert "cbios_spare_tries=3" in listed.splitlines()
    with pytest.raises(bootenv.BootEnvError, match="first 512"):
        bootenv.render({**FULL_STATE, "cbios_root_verity": "c" * 400})


def test_the_initrd_writes_the_state_keys_in_bootenvs_order() -> None:
    text = LIB_SH.read_text()
    listed = text.split("ENV_STATE_KEYS=(", 1)[1].split(")", 1)[0].split()
    assert tuple(listed) == bootenv.STATE_KEYS


def test_an_unreadable_boot_state_is_rebuilt_by_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import contextmanager

    from cbios.node import cli
    grubenv = tmp_path / "grubenv"
    grubenv.write_bytes(b"\0" * bootenv.SIZE)  # a torn or zeroed block
    release = tmp_path / "release"
    release.write_text("CBIOS_PROFILE=qemu-test\nCBIOS_VERSION=1.0.0\n")

    @contextmanager
    def partition(writable: bool = False) -> Iterator[Path]:
        yield grubenv

    monkeypatch.setattr(bootenv, "boot_partition", partition)
    monkeypatch.setattr(bootenv, "running_copy", lambda: "spare")
    monkeypatch.setattr(bootenv, "cmdline_value", lambda name, cmdline=None: "d" * 64 + ":100")
    monkeypatch.setattr(cli.status, "RELEASE", release)
    assert cli.main(["commit"]) == 0
    env = bootenv.read(grubenv)
    assert (env["cbios_active"], env["cbios_spare_state"], env["cbios_root_state"]) == ("spare", "good", "bad")
    assert env["cbios_spare_verity"] == "d" * 64 + ":100" and "unreadable" in env["cbios_fallback"]


def test_a_copy_rewritten_by_an_update_loses_its_own_kernel_parameters() -> None:
    env = {"cbios_active": "root", "cbios_root_state": "good", "cbios_spare_state": "good",
           "cbios_spare_cmdline": "rdinit=/nonexistent", "cbios_root_cmdline": "quiet"}
    after = bootenv.marked_bad(env, "spare")
    assert "cbios_spare_cmdline" not in after and after["cbios_root_cmdline"] == "quiet"


def test_running_copy_of_a_netboot_comes_from_the_initrd(tmp_path: Path) -> None:
    (tmp_path / "copy").write_text("spare\n")
    assert bootenv.running_copy("cbios.netboot cbios.vg=lvm", tmp_path / "copy") == "spare"
    assert bootenv.running_copy("cbios.copy=root", tmp_path / "copy") == "root"  # GRUB's word first
    assert bootenv.running_copy("cbios.netboot", tmp_path / "none") is None


@pytest.mark.parametrize(("document", "values"), [
    ({"profile": "qemu-test", "layout": {"tries": 3}, "artifacts": {"root.img": {"size": 114294784}}, "x": "a\nb"},
     {".profile": '"qemu-test"', ".layout.tries": "3", '.artifacts["root.img"].size': "114294784",
      ".missing": "null", ".x": '"a\\nb"'}),  # one line each, whatever a value holds
    ([1], None),  # not an object
    ({"profile": "p", "layout": "flat"}, None),  # a filter that fails
    ({"profile": "p", "layout": {"tries": [1, 2]}, "x": 1, "missing": 1}, None),  # .layout.tries[] gives two
])
def test_the_flasher_reads_its_manifest_in_one_jq_pass(tmp_path: Path, document: object,
                                                       values: dict[str, str] | None) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(document))
    filters = list(values or {".profile": "", ".layout.tries[]": "", ".x": "", ".missing": "", ".layout.vg": ""})
    quoted = " ".join(f"'{f}'" for f in filters)
    show = 'for k in "${!JSON_VALUE[@]}"; do printf "%s\\t%s\\n" "$k" "${JSON_VALUE[$k]}"; done'
    proc = subprocess.run(["bash", "-c", f'set -eu; . "{LIB_SH}"; json_values "{path}" {quoted} || exit 3; {show}'],
                          capture_output=True, text=True, check=False)
    if values is None:
        assert proc.returncode == 3, proc.stdout + proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert dict(line.split("\t", 1) for line in proc.stdout.splitlines()) == values


def test_the_contract_between_build_and_node_is_written_once() -> None:
    """Each path and name of cbios/node/contract.py is a literal there and nowhere else in cbios/."""
    from cbios.node import contract
    facts = {k: str(v) for k, v in vars(contract).items() if k.isupper() and isinstance(v, str | Path)}
    assert {"MANIFEST", "UPDATE_KEY", "SLOTS", "EXECUTOR_SOCKET", "CLUSTER_KEY", "MANAGER_TEMPLATE"} <= set(facts)
    sources = [p for p in (Path(__file__).resolve().parents[2] / "cbios").rglob("*.py") if p.name != "contract.py"]
    for name, value in facts.items():
        again = [str(p) for p in sources if f'"{value}"' in p.read_text() or f"'{value}'" in p.read_text()]
        assert not again, f"{name} ({value}) written again in {again}"
