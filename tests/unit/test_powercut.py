"""Where a power cut landed, read from what the cut node printed (cbios/powercut.py)."""

from __future__ import annotations

import pytest

from cbios.errors import CbiosError
from cbios.powercut import PHASES, STAGES, Trial, check_phases, landed, summary

UPDATE = """\
cbios: manifest.json: signature good (/usr/share/cbios/signing.pub)
cbios: qemu-test 1.0.0 -> 1.0.0: 104 MiB
cbios: writing copy spare (/dev/lvm/root-spare)
cbios: writing copy spare: 52 of 104 MiB (50%)
"""

FIRST_BOOT = """\
[  301.2] systemd-shutdown[1]: Syncing filesystems and block devices.
CBIOS: booting copy spare (lvm/root-spare, state new)
[   98.1] health[545]: cbios: committed copy spare
"""


@pytest.mark.parametrize(("phase", "console", "stage"), [
    ("update", "", "fetching"),
    ("update", UPDATE, "writing the copy"),
    ("update", UPDATE + "cbios: reading copy spare back through dm-verity\n", "reading it back"),
    ("first-boot", FIRST_BOOT.splitlines()[0], "shutting down"),
    ("first-boot", "\n".join(FIRST_BOOT.splitlines()[:2]), "booting the new copy"),
    ("first-boot", FIRST_BOOT, "committed"),
    ("install", "[    1.2] Linux version 6.1.0", "booting the flasher"),
    ("install", "cbios-flash: writing both copies\ncbios-flash: slot volume slot1-0: service (image)\n",
     "filling slot volumes"),
])
def test_a_cut_is_placed_at_the_last_stage_its_console_shows(phase: str, console: str, stage: str) -> None:
    assert landed(phase, console) == stage


def test_every_phase_has_its_stages_from_its_start() -> None:
    assert set(STAGES) == set(PHASES)
    for stages in STAGES.values():
        assert stages[0][0] == ""  # the phase's start: reached by any console
        assert len({stage for _, stage in stages}) == len(stages)


def test_an_unknown_phase_is_named() -> None:
    with pytest.raises(CbiosError, match="no phase 'boot'"):
        check_phases(("update", "boot"))


def test_a_phase_is_summed_up_by_where_its_cuts_fell() -> None:
    trials = [Trial("update", 3.0, "writing the copy", True, "READY", "c1"),
              Trial("update", 9.5, "writing the copy", True, "READY", "c2"),
              Trial("update", 0.4, "fetching", False, "copy root runs but is bad", "c3")]
    figures = summary("update", trials, 20, 17.2)
    assert (figures["recovered"], figures["of"], figures["planned"], figures["window_s"]) == (2, 3, 20, 17.2)
    assert list(figures["landed"].items()) == [("fetching", 1), ("writing the copy", 2)]  # in the phase's order
    assert figures["trials"][2]["detail"] == "copy root runs but is bad"
