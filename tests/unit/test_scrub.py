"""Corrupt copies: the scrub's verdicts, what the boot state becomes, and versions refused
after failing the health gate. The dm-verity read itself is the kernel's: VM tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cbios.node import update
from cbios.node.boot import bootenv, scrub, verity
from tests.unit.test_node_update import FakeNode, make_release, mkdir

PARAM = verity.Verity("ab" * 32, 1000).param
GOOD = {"cbios_active": "root", "cbios_root_state": "good", "cbios_spare_state": "good",
        "cbios_root_verity": PARAM, "cbios_spare_verity": PARAM}


def checker(corrupt: set[str]):  # type: ignore[no-untyped-def]
    seen: list[tuple[Path, str]] = []

    def check(device: Path, v: verity.Verity, name: str) -> str | None:
        seen.append((device, name))
        return f"{device}: corrupt: block 7 of {v.data_blocks} does not match the root hash" \
            if device.name in corrupt else None
    return check, seen


def devices(copy: str) -> Path:
    return Path("/dev/lvm") / bootenv.COPIES[copy]


def test_a_clean_node_changes_nothing() -> None:
    check, seen = checker(set())
    findings = scrub.scrub_copies(GOOD, devices, check)
    assert [(f.copy, f.result) for f in findings] == [("root", "clean"), ("spare", "clean")]
    assert [name for _, name in seen] == ["cbios-scrub-root", "cbios-scrub-spare"]
    assert scrub.mark(dict(GOOD), findings) == GOOD


def test_the_scrub_at_boot_reads_the_running_copy_alone() -> None:
    check, seen = checker({"root-spare"})
    findings = scrub.scrub_copies(GOOD, devices, check, copies=("root",))
    assert [(f.copy, f.result) for f in findings] == [("root", "clean")]
    assert [name for _, name in seen] == ["cbios-scrub-root"]


def test_a_corrupt_running_copy_gives_way_to_the_other_and_says_why() -> None:
    check, _ = checker({"root"})
    env = scrub.mark(dict(GOOD), scrub.scrub_copies(GOOD, devices, check))
    assert (env["cbios_root_state"], env["cbios_active"]) == ("bad", "spare")
    assert env["cbios_corrupt"].startswith("copy root: corrupt: /dev/lvm/root: corrupt: block 7")
    assert env["cbios_fallback"] == env["cbios_corrupt"]
    assert scrub.should_reboot(env, "root")


def test_a_corrupt_spare_is_marked_bad_and_never_booted_while_the_primary_runs() -> None:
    check, _ = checker({"root-spare"})
    env = scrub.mark(dict(GOOD), scrub.scrub_copies(GOOD, devices, check))
    assert (env["cbios_spare_state"], env["cbios_active"], env["cbios_root_state"]) == ("bad", "root", "good")
    assert "cbios_fallback" not in env and env["cbios_corrupt"].startswith("copy spare: corrupt")
    assert not scrub.should_reboot(env, "root")
    # A bad copy is not read again.
    check2, seen = checker(set())
    assert [f.result for f in scrub.scrub_copies(env, devices, check2)] == ["clean", "skipped"]
    assert len(seen) == 1


def test_with_both_copies_corrupt_the_node_stays_on_the_one_it_runs() -> None:
    check, _ = checker({"root", "root-spare"})
    env = scrub.mark(dict(GOOD), scrub.scrub_copies(GOOD, devices, check))
    assert (env["cbios_root_state"], env["cbios_spare_state"]) == ("bad", "bad")
    assert not scrub.should_reboot(env, "root") and not scrub.should_reboot(env, "spare")


def test_a_copy_without_verity_is_skipped_not_taken_for_corrupt() -> None:
    env = {**GOOD, "cbios_spare_verity": "garbage"}
    env.pop("cbios_root_verity")
    check, seen = checker(set())
    assert [f.result for f in scrub.scrub_copies(env, devices, check)] == ["skipped", "skipped"]
    assert seen == []


def test_a_version_that_failed_on_trial_is_refused_until_it_becomes_ready() -> None:
    trial = {**GOOD, "cbios_active": "spare", "cbios_spare_state": "new", "cbios_spare_tries": "0"}
    env = bootenv.with_failure(trial, "spare", "2.0.0", "state=degraded")
    assert bootenv.refused(env) == ["2.0.0"]
    assert bootenv.refused(bootenv.with_failure(GOOD, "root", "1.0.0", "x")) == []  # a committed copy: not refused
    for n in range(10):
        env = bootenv.with_failure({**env, "cbios_spare_state": "new"}, "spare", f"3.0.{n}", "x")
    assert len(bootenv.refused(env)) == bootenv.REFUSED_KEEP and bootenv.refused(env)[-1] == "3.0.9"
    assert "3.0.9" not in bootenv.refused(bootenv.committed(env, "spare", "3.0.9"))


def test_the_fullest_boot_state_fits_its_block() -> None:
    env = {**GOOD, "cbios_root_tries": "9", "cbios_spare_tries": "9", "cbios_installed": "x" * 40 + " 1.22.333.4444",
           "cbios_updated": "x" * 40 + " 1.22.333.4444", "cbios_cmdline_extra": "x" * 60,
           "cbios_refused": " ".join(["1.22.333.4444"] * bootenv.REFUSED_KEEP)}
    env = bootenv.with_failure(env, "root", "1.22.333.4444", "y" * 1000)
    env = bootenv.corrupted(env, "spare", "z" * 1000)
    env["cbios_fallback"] = "w" * bootenv.CORRUPT_MAX
    assert len(bootenv.render(env)) == bootenv.SIZE


def test_update_refuses_a_version_that_failed_here(tmp_path: Path) -> None:
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / "k.pem")], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "k.pem"), "-pubout", "-out", str(tmp_path / "p.pem")],
                   check=True)
    node = FakeNode(mkdir(tmp_path / "n"), tmp_path / "p.pem", cbios_refused="1.5.0 2.0.0")
    release = make_release(tmp_path / "v2", tmp_path / "k.pem")
    before = node.snapshot()
    with pytest.raises(update.UpdateError, match=r"version 2\.0\.0 failed the health gate on this node before"):
        update.update(node.node, str(release), say=lambda _: None)
    assert node.snapshot() == before
    assert update.update(node.node, str(release), force=True, say=lambda _: None)["version"] == "2.0.0"
