"""The build's bookkeeping: manifests, publishing, and what a failed build leaves."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from cbios import build as build_mod
from cbios import image, manifest
from cbios.artifacts import ARTIFACTS
from cbios.errors import StepError
from cbios.profile import load_profile
from cbios.project import Project


def test_manifest_describe_and_verify(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"hello")
    (tmp_path / "b").write_bytes(b"x" * 3_000_000)
    data = {"artifacts": manifest.describe(tmp_path, ["b", "a"])}
    assert data["artifacts"]["a"] == {"sha256": hashlib.sha256(b"hello").hexdigest(), "size": 5}
    manifest.write(tmp_path / manifest.MANIFEST, data)
    assert manifest.verify(tmp_path) == []
    (tmp_path / "a").write_bytes(b"jello")
    (tmp_path / "b").unlink()
    assert manifest.verify(tmp_path) == ["a: sha256 does not match the manifest", "b: missing"]


def test_failed_step_publishes_nothing_and_keeps_the_previous_build(
        tmp_project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CBIOS_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setenv("CBIOS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_project.root / "initrd" / "tree").mkdir(parents=True)
    (tmp_project.root / "initrd" / "mkosi.conf.j2").write_text("[Output]\nFormat=cpio\n")
    profile = load_profile(tmp_project, "base")
    out = tmp_project.build / "base"
    out.mkdir(parents=True)
    for name in ARTIFACTS:
        (out / name).write_text(f"old {name}")
    manifest.write(out / manifest.MANIFEST, {"artifacts": manifest.describe(out, ARTIFACTS)})
    calls = []

    def failing_mkosi(image: object, **kw: object) -> None:
        calls.append(image)
        raise StepError("mkosi initrd", "apt-get failed")

    monkeypatch.setattr(build_mod.mkosi, "build", failing_mkosi)
    with pytest.raises(StepError, match="mkosi initrd: apt-get failed"):
        build_mod.build(tmp_project, profile)
    assert calls
    assert manifest.verify(out) == []  # the previous build, whole and consistent
    assert (out / "root.img").read_text() == "old root.img"


def test_var_moves_to_factory_with_tmpfiles_lines_that_refill_it(tmp_path: Path) -> None:
    from cbios.image import FACTORY_VAR, TMPFILES, _var_to_factory

    tree = tmp_path / "root"
    (tree / "var/lib/dpkg").mkdir(parents=True)
    (tree / "var/lib/dpkg/status").write_text("Package: x\n")
    (tree / "var/tmp").mkdir(mode=0o1777)
    (tree / "var/tmp").chmod(0o1777)
    (tree / "var/run").symlink_to("/run")
    _var_to_factory(tree)
    assert list((tree / "var").iterdir()) == []
    assert (tree / FACTORY_VAR / "lib/dpkg/status").read_text() == "Package: x\n"
    lines = (tree / TMPFILES).read_text().splitlines()
    assert "d /var/lib 0755 root root -" in lines
    assert f"L+ /var/lib/dpkg - - - - /{FACTORY_VAR}/lib/dpkg" in lines  # the running copy's
    assert f"C /var/run - - - - /{FACTORY_VAR}/run" in lines
    assert "d /var/tmp 1777 root root -" in lines


def test_debian_bytecode_is_compiled_again_with_unchecked_hashes(tmp_path: Path) -> None:
    import importlib.util
    import marshal
    import py_compile
    import sys

    tree = tmp_path / "root"
    lib = tree / "usr/lib/python3.11/json"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("X = 1\n")
    py_compile.compile(str(lib / "__init__.py"), dfile="/usr/lib/python3.11/json/__init__.py",
                       invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    (lib / "notcompiled.py").write_text("Y = 2\n")
    orphan = lib / "__pycache__" / f"gone.{sys.implementation.cache_tag}.pyc"
    orphan.write_bytes(b"old")
    pyc = Path(importlib.util.cache_from_source(str(lib / "__init__.py")))
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b11  # hash-based, checked

    assert image.unchecked_bytecode(tree) == 1
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b01  # hash-based, not checked
    assert not (lib / "__pycache__" / f"notcompiled.{sys.implementation.cache_tag}.pyc").exists()
    assert orphan.read_bytes() == b"old"
    code = marshal.loads(pyc.read_bytes()[16:])  # the node's path, as tracebacks show it
    assert code.co_filename == "/usr/lib/python3.11/json/__init__.py"


def _cpio(tree: Path, when: int) -> bytes:
    for path in tree.rglob("*"):
        os.utime(path, (when, when), follow_symlinks=False)
    names = "\n".join(sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))) + "\n"
    return subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=names.encode(), cwd=tree,
                          capture_output=True, check=True).stdout


def test_an_initrd_whose_files_did_not_change_packs_to_the_same_bytes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/a").write_text("a\n")
    os.link(tree / "etc/a", tree / "etc/b")  # a hard link stays one
    (tree / "etc/c").write_text("c\n")
    first, second = _cpio(tree, 1_000_000), _cpio(tree, 2_000_000)
    assert first != second
    joined = image.reproducible_cpio(first + b"\0" * 512 + first, 7)
    assert image.reproducible_cpio(second + b"\0" * 512 + second, 7) == joined
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=joined, cwd=out, check=True)
    assert (out / "etc/c").read_text() == "c\n" and (out / "etc/c").stat().st_mtime == 7
    assert (out / "etc/a").stat().st_ino == (out / "etc/b").stat().st_ino
    with pytest.raises(StepError, match="not a newc cpio archive at byte 0"):
        image.reproducible_cpio(b"garbage", 0)


def test_mkosis_trees_go_once_published_and_its_files_stay(tmp_path: Path) -> None:
    outputs = tmp_path / "out"
    for image_dir, tree in (("root", "root"), ("slot-service", "service")):
        (outputs / image_dir / tree / "usr" / "bin").mkdir(parents=True)
        (outputs / image_dir / tree / "usr" / "bin" / "sh").write_text("x")
        (outputs / image_dir / f"{tree}.manifest").write_text("{}")
    (outputs / "root" / "root.vmlinuz").write_text("kernel")
    (outputs / "root" / "link").symlink_to(outputs / "root" / "root")
    (outputs / "stray-file").write_text("not an image's folder")
    build_mod._drop_trees(outputs)
    left = sorted(str(p.relative_to(outputs)) for p in outputs.rglob("*"))
    assert left == ["root", "root/link", "root/root.manifest", "root/root.vmlinuz", "slot-service",
                    "slot-service/service.manifest", "stray-file"]
