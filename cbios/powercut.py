"""Power-cut trials: a node's QEMU killed at a random moment of an install, of an update, or
of the first boot of a new copy; then the node must boot to ready on a good copy with its
/var and its slots' volumes as they were. `invoke power-cuts --count N [--phase P]` runs N
trials of each phase (or of P alone) and adds them to build/NAME/power-cuts.json; `invoke
bench --power-cuts N` runs them after its figures.

The moment is drawn from a window as long as the phase takes: each phase is first run once
whole on this machine and timed (MEASURES). Where in the phase a cut landed is read from the
cut node's console (STAGES) and kept with the trial."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cbios.artifacts import DISK, WORK
from cbios.boot import disk_boot_spec
from cbios.build import build
from cbios.disk import FLASH_TIMEOUT, disk_size, flasher_spec, make_disk, make_media, overlay
from cbios.errors import CbiosError
from cbios.machine import Machine
from cbios.profile import Profile, load_profile
from cbios.project import Project
from cbios.pxe.bundle import PXE_DIR
from cbios.pxe.lab import GUEST_SERVER, JOIN_NODE, PxeLab
from cbios.run import run

log = logging.getLogger("cbios")

PHASES = ("install", "update", "first-boot")
RESULTS = "power-cuts.json"  # in build/NAME/, beside bench.json
# A file in /var and one on a slot's volume, written and synced before the power may go: what
# the node had on disk must be there after it. (Unsynced, they are lost to a cut within ext4's
# commit interval, as any file would be.)
MARK = ("echo kept > /var/lib/cbios-power-cut; "
        "lxc-attach -n slot2 -- sh -c 'echo kept > /var/lib/dnsmasq/cbios-power-cut'; sync")
KEPT = "cat /var/lib/cbios-power-cut; lxc-attach -n slot2 -- cat /var/lib/dnsmasq/cbios-power-cut"
UPDATE = f"cbios update http://{GUEST_SERVER}/ --allow-downgrade --no-reboot"


@dataclass
class Trial:
    phase: str
    cut_after_s: float
    landed: str  # how far the phase got before the cut: a stage of STAGES
    recovered: bool
    detail: str
    console: str  # the console the cut fell in


# How far a phase got, from the lines the cut node printed from the phase's start: each stage
# is reached when its text is on the console (the flasher's and `cbios update`'s own lines,
# GRUB's, health's), in this order; before the first, the phase's start.
STAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "install": (("", "booting the flasher"), ("signature good", "signature checked"),
                ("writing both copies", "writing the copies"), ("written and read back", "copies verified"),
                ("slot volume", "filling slot volumes"), ("FLASHED", "flashed")),
    "update": (("", "fetching"), ("signature good", "signature checked"), ("writing copy", "writing the copy"),
               ("back through dm-verity", "reading it back"), ("UPDATED", "updated")),
    "first-boot": (("", "shutting down"), ("CBIOS: booting copy", "booting the new copy"),
                   ("committed copy", "committed"), ("READY", "ready")),
}


def landed(phase: str, console: str) -> str:
    """The last stage of PHASE that CONSOLE (what the node printed from the phase's start) shows."""
    return [stage for text, stage in STAGES[phase] if text in console][-1]


@dataclass
class Site:
    """What every trial of one profile needs: its build, its node disk, a place for logs."""

    project: Project
    profile: Profile
    out: Path
    node_disk: Path
    logdir: Path

    def machine(self, disk: Path, name: str, lab: PxeLab | None = None) -> Machine:
        spec = disk_boot_spec(self.project, self.profile, self.out, disk, persist=True)
        if lab is not None:
            spec.pxe = lab.netdev_options()
        return Machine(spec, self.logdir, name=name)

    def ready(self, m: Machine) -> str:
        """The next READY, FAILED boots on the way skipped (a new copy spends its tries)."""
        return m.wait_report(("READY",), 3 * self.profile.qemu.ready_timeout, skip_failed=True)


def _good_copy(m: Machine) -> str:
    """'' if the node runs a committed copy with its /var and slot volume as they were."""
    st = json.loads(m.succeed("cbios status --json"))
    running = st["running"]
    if st["copies"][running]["state"] != "good":
        return f"copy {running} runs but is {st['copies'][running]['state']}"
    kept = m.execute(KEPT, timeout=60)[1]
    return "" if kept == "kept\nkept" else f"/var or the slot volume changed: {kept!r}"


def _cut(m: Machine, after: float, started: float) -> None:
    time.sleep(max(0.0, started + after - time.monotonic()))  # the power cut: its moment is the trial
    m.kill()


@dataclass
class Chain:
    """What the trials of one phase share. An update or first-boot trial that recovered leaves
    its node ready, and the next trial's cut falls in that QEMU: one node goes through cut
    after cut, as a node in the field would, and a trial boots once, not twice. A trial that
    did not recover ends the chain; the next starts from the node disk again. WORK: the
    phase's folder."""

    work: Path
    lab: PxeLab | None = None  # the release server, for the phase's whole run
    m: Machine | None = None
    disk: Path | None = None

    def end(self) -> None:
        if self.m is not None:
            self.m.kill()
        self.m = None


def _blank_node(site: Site, chain: Chain) -> tuple[Path, Path, Path]:
    """A folder of the chain's with install media and a blank disk in it; the three paths."""
    work = Path(tempfile.mkdtemp(prefix="install-", dir=chain.work))
    media = work / "media.img"
    make_media(site.out, media, work / "media.log")
    disk = work / "node.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", disk, str(disk_size(site.project, site.profile))], step="qemu-img")
    return work, media, disk


def trial_install(site: Site, chain: Chain, rng: random.Random, length: float) -> Trial:
    """The flasher installing from media, cut; powered on again it installs again (no force)."""
    work, media, disk = _blank_node(site, chain)
    cut = rng.uniform(0, length)
    spec = flasher_spec(site.project, site.profile, site.out, disk, media)
    try:
        with Machine(spec, site.logdir, name="cut-install") as m:
            _cut(m, cut, m.started_at)
            stage = landed("install", m.console())
            cut_in = str(m.console_log)
        with Machine(flasher_spec(site.project, site.profile, site.out, disk, media), site.logdir,
                     name="cut-install-again") as m:
            line = m.wait_report(("FLASHED", "FAILED"), FLASH_TIMEOUT)
            m.wait_exit(120)
        if not line.startswith("FLASHED"):
            return Trial("install", cut, stage, False, line, cut_in)
        with site.machine(disk, "cut-install-boot") as m:
            ready = site.ready(m)
            m.succeed(MARK)
            problem = _good_copy(m)
            m.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Trial("install", cut, stage, not problem, problem or ready, cut_in)


def _node(site: Site, chain: Chain) -> Machine:
    """The chain's node, ready and on the lab's link: as the last trial left it, or the node
    disk booted anew, its /var and a slot's volume marked."""
    if chain.m is None or not chain.m.running():
        assert chain.lab is not None
        chain.disk = overlay(site.node_disk, Path(tempfile.mkdtemp(prefix="node-", dir=chain.work)) / "node.qcow2")
        chain.m = site.machine(chain.disk, "boot", chain.lab)
        chain.m.start()
        site.ready(chain.m)
        chain.m.succeed(MARK)
    chain.m.succeed(JOIN_NODE)  # after every boot: the address does not outlive one
    return chain.m


def _cut_running_node(site: Site, chain: Chain, rng: random.Random, length: float, phase: str,
                      prepare: str, command: str) -> Trial:
    """The chain's node, ready: PREPARE run to its end, then COMMAND left running and the power
    cut at a random moment; then the node boots, and must be ready on a good copy."""
    cut = rng.uniform(0, length)
    try:
        m = _node(site, chain)
        cut_in = str(m.console_log)
        if prepare:
            m.succeed(prepare, timeout=900)
        start = m.console_log.stat().st_size
        m.in_background(command)
        _cut(m, cut, time.monotonic())
        stage = landed(phase, m.console(start))
        assert chain.disk is not None and chain.lab is not None
        m = chain.m = site.machine(chain.disk, "after-cut", chain.lab)
        m.start()
        ready = site.ready(m)
        problem = _good_copy(m)
    except BaseException:
        chain.end()
        raise
    if problem:
        chain.end()
    return Trial(phase, cut, stage, not problem, problem or ready, cut_in)


def trial_update(site: Site, chain: Chain, rng: random.Random, length: float) -> Trial:
    """`cbios update` writing the other copy, cut; the node boots a good copy."""
    return _cut_running_node(site, chain, rng, length, "update", "", UPDATE)


def trial_first_boot(site: Site, chain: Chain, rng: random.Random, length: float) -> Trial:
    """A new copy written, then its first boot cut (before, around or after its commit)."""
    return _cut_running_node(site, chain, rng, length, "first-boot", UPDATE, "systemctl reboot")


TRIALS: dict[str, Callable[[Site, Chain, random.Random, float], Trial]] = {
    "install": trial_install, "update": trial_update, "first-boot": trial_first_boot}


def measure_install(site: Site, chain: Chain) -> float:
    """Power-on to FLASHED, from media onto a blank disk."""
    work, media, disk = _blank_node(site, chain)
    try:
        with Machine(flasher_spec(site.project, site.profile, site.out, disk, media), site.logdir,
                     name="install-whole") as m:
            m.wait_report(("FLASHED",), FLASH_TIMEOUT)
            return time.monotonic() - m.started_at
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_update(site: Site, chain: Chain) -> float:
    """`cbios update`, from the command to its end."""
    m = _node(site, chain)
    start = time.monotonic()
    m.succeed(UPDATE, timeout=900)
    return time.monotonic() - start


def measure_first_boot(site: Site, chain: Chain) -> float:
    """A new copy's first boot: `systemctl reboot` to its commit. The node's QEMU is then
    let go (its shell does not outlive the reboot), so the first trial boots the disk again."""
    m = _node(site, chain)
    m.succeed(UPDATE, timeout=900)
    offset = m.console_log.stat().st_size
    start = time.monotonic()
    m.in_background("systemctl reboot")
    m.wait_console("committed copy", 3 * site.profile.qemu.ready_timeout, offset)
    seconds = time.monotonic() - start
    chain.end()
    return seconds


# Each phase timed whole, and how far past its end the window of its cuts reaches: the
# first boot's goes half past the commit, so that some cuts fall after it (a boot's time
# varies by ±20 s under TCG: with a quarter, 1 cut in 20 fell after the commit).
MEASURES: dict[str, tuple[Callable[[Site, Chain], float], float]] = {
    "install": (measure_install, 1.0), "update": (measure_update, 1.0), "first-boot": (measure_first_boot, 1.5)}


def summary(phase: str, trials: list[Trial], count: int, window: float) -> dict[str, Any]:
    """The figures of PHASE's TRIALS so far, of COUNT: how many recovered, how many cuts fell
    in each stage, and each trial's moment and verdict."""
    landed = {stage: sum(t.landed == stage for t in trials) for _, stage in STAGES[phase]}
    return {"recovered": sum(t.recovered for t in trials), "of": len(trials), "planned": count, "window_s": window,
            "landed": {stage: n for stage, n in landed.items() if n}, "trials": [t.__dict__ for t in trials]}


def run_trials(site: Site, phases: tuple[str, ...], count: int, seed: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """COUNT trials of each phase; after each, the phase and its figures so far."""
    rng = random.Random(seed)
    for phase in phases:
        trials = []
        with tempfile.TemporaryDirectory(prefix=f"cbios-cut-{phase}-") as tmp, contextlib.ExitStack() as stack:
            chain = Chain(Path(tmp))
            stack.callback(chain.end)
            if phase != "install":
                chain.lab = stack.enter_context(PxeLab(site.out / PXE_DIR, chain.work / "server", mode=None))
            measure, reach = MEASURES[phase]
            window = round(reach * measure(replace(site, logdir=site.logdir / f"{phase}-whole"), chain), 1)
            log.info("‣ power cuts %s: the phase took %.1f s whole; cuts drawn from 0 to %.1f s", phase,
                     window / reach, window)
            for n in range(count):
                logdir = site.logdir / f"{phase}-{n + 1}"  # each trial's consoles apart, to read a failed one
                try:
                    t = TRIALS[phase](replace(site, logdir=logdir), chain, rng, window)
                except CbiosError as e:
                    t = Trial(phase, -1, "", False, str(e).splitlines()[0], "")
                log.info("‣ power cut %s #%d after %.1f s (%s): %s (%s); cut in %s", phase, n + 1, t.cut_after_s,
                         t.landed, "recovered" if t.recovered else "NOT RECOVERED", t.detail, t.console or logdir)
                trials.append(t)
                yield phase, summary(phase, trials, count, window)


def check_phases(phases: tuple[str, ...]) -> None:
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise CbiosError(f"power cuts: no phase {unknown[0]!r} (phases: {', '.join(PHASES)})")


def record(project: Project, profile: Profile, out: Path, phases: tuple[str, ...], count: int,
           seed: int | None = None) -> dict[str, Any]:
    """COUNT trials of each of PHASES on the build in OUT and its node disk, their moments
    drawn with SEED (default: the clock). Each phase's result replaces that phase's in
    OUT/power-cuts.json, so the phases may run one at a time; the file is written after each
    trial, so that a long run broken off keeps what it did. The file's figures."""
    check_phases(phases)
    seed = int(time.time()) if seed is None else seed
    site = Site(project, profile, out, out / DISK, out / WORK / "power-cuts")
    path = out / RESULTS
    figures = json.loads(path.read_text()) if path.exists() else {}
    for phase, result in run_trials(site, phases, count, seed):
        figures[phase] = {"version": profile.version, "seed": seed, **result}
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps(figures, indent=2) + "\n")
        part.replace(path)
    return figures


def run_power_cuts(name: str, count: int, phases: tuple[str, ...], seed: int | None = None) -> dict[str, Any]:
    """The trials of `invoke power-cuts`: the profile built and its node disk made first if
    needed; a line a phase of what power-cuts.json now holds."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_phases(phases)  # before anything is built
    project = Project.find()
    profile = load_profile(project, name)
    out = build(project, profile)
    make_disk(project, profile)
    figures = record(project, profile, out, phases, count, seed)
    for phase in PHASES:
        if phase in figures:
            where = ", ".join(f"{n} {stage}" for stage, n in figures[phase].get("landed", {}).items())
            print(f"{phase:>10}: {figures[phase]['recovered']} of {figures[phase]['of']} recovered"
                  + (f" (cut while: {where})" if where else ""))
    print(f"(written to {project.display(out / RESULTS)})")
    return figures
