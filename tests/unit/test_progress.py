"""Progress of mkosi, the flasher and `cbios pxe serve`: plain log lines off a terminal (no
control codes), a live region on one. mkosi's output is one recorded from a real build (the
apt part shortened), the flasher's console one recorded from a real flash."""

from __future__ import annotations

import http.client
import io
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rich.console import Console

from cbios import disk, mkosi, progress
from cbios.errors import StepError
from cbios.flasher_watch import FlasherWatch
from cbios.mkosi import MkosiImage
from cbios.node.httpd import BundleServer
from cbios.progress import StatusLine, TransferBoard
from cbios.pxe.transfers import node_rows
from cbios.qemu import VmSpec

DATA = Path(__file__).parent / "data"
MKOSI_LOG = DATA / "mkosi-root-build.log"
FLASHER_CONSOLE = DATA / "flasher-console.log"
ESC = "\x1b"
MAC = "52:54:00:12:34:56"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextmanager
def stderr(*, tty: bool) -> Iterator[tuple[Console, io.StringIO]]:
    """A stand-in for stderr as `cbios` uses it: the console progress is drawn on, and the
    log lines ("%(message)s") written to the same stream."""
    out = io.StringIO()
    con = Console(file=out, force_terminal=tty, force_interactive=tty, width=120, highlight=False)
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("cbios")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield con, out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert handler.stream is out  # put back where it was, live or not


def fake_mkosi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int = 0) -> MkosiImage:
    """An `mkosi` on PATH that prints the recorded output; the image to build with it."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "mkosi").write_text(f"#!/bin/sh\ncat '{MKOSI_LOG}'\nexit {status}\n")
    (bindir / "mkosi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return MkosiImage("root", tmp_path / "conf", tmp_path / "out", tmp_path / "cache", tmp_path / "packages")


def test_mkosi_steps_are_plain_lines_once_each_off_a_terminal(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    image = fake_mkosi(tmp_path, monkeypatch)
    log_file = tmp_path / "root.log"
    with stderr(tty=False) as (con, out):
        monkeypatch.setattr(progress, "console", lambda: con)
        mkosi.build(image, log_file=log_file)
    text = out.getvalue()
    assert ESC not in text
    lines = text.splitlines()
    assert lines[0] == f"‣ Building the root image with mkosi (log: {log_file})"
    assert re.fullmatch(r"  done in \d+\.\d s", lines[-1])
    steps = lines[1:-1]
    assert all(line.startswith("    mkosi root: ") for line in steps)
    assert len(steps) == 28  # the recorded run's different steps, of its 40 "‣" lines
    assert steps[:5] == ["    mkosi root: Copying in package manager file trees…",
                         "    mkosi root: /tmp/clone3/.cache/mkosi/root-ba3723db395a0ba6/debian~bookworm~x86-64.cache "
                         "does not exist, not reusing cached images",
                         "    mkosi root: Syncing package manager metadata for default image",
                         "    mkosi root: Building default image",
                         "    mkosi root: Installing Debian"]
    assert steps.count("    mkosi root: bootctl is not installed, assuming 'unknown' kernel type") == 1
    assert steps[-1] == "    mkosi root: /tmp/clone3/build/qemu-test/work/out/root/root size is 309.7M."
    # The whole output still goes to the log, as it came.
    command, output = log_file.read_bytes().split(b"\n", 1)
    assert command.startswith(f"+ mkosi --directory {image.config_dir} ".encode())
    assert output == MKOSI_LOG.read_bytes()


def test_a_failed_mkosi_is_reported_with_the_end_of_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = fake_mkosi(tmp_path, monkeypatch, status=3)
    with stderr(tty=False) as (con, _), pytest.raises(StepError, match="exit status 3") as failed:
        monkeypatch.setattr(progress, "console", lambda: con)
        mkosi.build(image, log_file=tmp_path / "root.log")
    assert "root size is 309.7M." in failed.value.message


def test_mkosi_step_is_one_live_line_on_a_terminal() -> None:
    with stderr(tty=True) as (con, out):
        with StatusLine("mkosi root", con) as status:
            assert status.live
            for line in MKOSI_LOG.read_text().splitlines():
                mkosi.show_step(status, line)
            logging.getLogger("cbios").info("a log line meanwhile")
            assert status.doing == "/tmp/clone3/build/qemu-test/work/out/root/root size is 309.7M."
            assert status.doing_text() == f"mkosi root: {status.doing}"
        text = out.getvalue()
    assert f"{ESC}[" in text  # drawn, and redrawn in place
    assert "a log line meanwhile" in text
    assert "root size is 309.7M." in text  # its last state, drawn as it stopped
    assert not any(line.startswith("    mkosi root:") for line in text.splitlines())  # no plain lines


def test_one_display_is_live_at_a_time_the_other_writes_plain_lines() -> None:
    with stderr(tty=True) as (con, out):
        with StatusLine("mkosi root", con) as first, StatusLine("flasher", con) as second:
            assert first.live and not second.live
            second.note("writing both copies")
        with StatusLine("flasher", con) as third:
            assert third.live  # the first let go of the terminal
    assert "    flasher: writing both copies" in out.getvalue()


def test_the_tty_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert not progress.console().is_interactive  # pytest's stderr is no terminal
    monkeypatch.setattr("sys.stderr", Terminal())
    assert progress.console().is_interactive
    monkeypatch.setenv("NO_COLOR", "1")
    assert progress.console().no_color
    monkeypatch.setenv("TERM", "dumb")
    assert not progress.console().is_interactive


def console_lines(start: int, end: int) -> str:
    return "".join(FLASHER_CONSOLE.read_text().splitlines(keepends=True)[start:end])


def test_flasher_progress_off_a_terminal_from_its_growing_console(tmp_path: Path) -> None:
    clock = FakeClock()
    console_log, target = tmp_path / "flasher.console.log", tmp_path / "disk.qcow2.tmp"
    with stderr(tty=False) as (con, out):
        status = StatusLine("flasher", con, clock=clock, plain_every=10)
        watch = FlasherWatch(console_log, status, target=target, clock=clock)
        watch.poll()  # no console yet
        first = console_lines(0, 20)
        with console_log.open("a") as f:
            f.write(first[:-30])  # a line cut in two: shown once it is whole
        clock.now += 1
        target.write_bytes(b"\1" * (4 << 20))
        watch.poll()
        with console_log.open("a") as f:
            f.write(first[-30:] + "[   30.0] flash[139]: cbios-flash: root.img: 52 of 105 MiB (49%)\n")
        clock.now += 4
        watch.poll()  # within 10 s of the last measure: none
        clock.now += 7
        with target.open("ab") as t:
            t.write(b"\2" * (4 << 20))
        with console_log.open("a") as f:
            f.write(console_lines(20, 50))
        watch.poll()
    text = out.getvalue()
    assert ESC not in text
    lines = text.splitlines()
    steps = [line for line in lines if "written to the disk" not in line]
    assert steps == [
        "    flasher: manifest.json: signature good",
        "    flasher: qemu-test 1.0.0: root.img 105 MiB, sha256 1441e2df7508",
        "    flasher: installing qemu-test 1.0.0 on /dev/vda (2701 MiB)",
        "    flasher: writing both copies",
        "    flasher: root.img: 105 of 105 MiB (100%) in 7 s",
        "    flasher: written and read back through dm-verity: root root-spare "
        "(1441e2df7508c2406f1eb8fecb04a3c9dc8fd55012be4b4379f2672ecf91b1b7)",
        "    flasher: slot volume slot0-0: cb-manager (seed)",
        "    flasher: slot volume slot0-1: cb-manager (format)",
        "    flasher: slot volume slot2-0: dhcp (seed)",
        "    flasher: slot volume slot4-0: boot-server (seed)",
        "    flasher: slot volume slot5-0: service (image)",
        "    flasher: slot volume slot6-0: dns_master (seed)",
        "    flasher: slot volume slot7-0: compute (image)",
    ]  # no verdict nor receipt: the report port's verdict is logged by the machine
    measures = [line for line in lines if "written to the disk" in line]
    assert len(measures) == 2  # at 1 s and 12 s, not at 5 s
    assert re.fullmatch(r"    flasher: \d\.\d MiB written to the disk, \d\.\d MiB/s", measures[0])
    assert re.fullmatch(r"    flasher: root\.img 49%, \d\.\d MiB written to the disk, 0\.\d MiB/s", measures[1])


def test_flash_shows_the_flasher_and_its_verdict(fake_qemu: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU", "flash")
    monkeypatch.setenv("FAKE_QEMU_CONSOLE", str(FLASHER_CONSOLE))
    spec = VmSpec(memory=512, cpus=1, accel="tcg", kernel=Path("/k"), initrd=Path("/i"))
    with stderr(tty=False) as (con, out):
        monkeypatch.setattr(progress, "console", lambda: con)
        assert disk.flash(spec, tmp_path / "vm", "flasher") == "FLASHED install fake 1.0 on /dev/vda"
    text = out.getvalue()
    assert ESC not in text
    assert "    flasher: writing both copies\n" in text
    assert re.search(r"^  flasher after \d+\.\d s: FLASHED install fake 1.0 on /dev/vda$", text, re.M)
    assert "receipt" not in text


@pytest.fixture
def bundle_server(tmp_path: Path) -> Iterator[BundleServer]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "root.img").write_bytes(b"r" * (3 << 20))
    server = BundleServer(("127.0.0.1", 0), bundle, ["root.img"], tmp_path / "receipts")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def fetch(server: BundleServer) -> int:
    """Bytes of root.img a client gets (fewer if the server breaks off)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", f"/root.img?mac={MAC}")
        return len(conn.getresponse().read())
    except http.client.IncompleteRead as e:
        return len(e.partial)
    finally:
        conn.close()


def test_pxe_transfers_as_plain_lines_off_a_terminal(bundle_server: BundleServer) -> None:
    clock = FakeClock()
    bundle_server.hold("root.img", 1 << 20)
    got: list[int] = []
    client = threading.Thread(target=lambda: got.append(fetch(bundle_server)))
    with stderr(tty=False) as (con, out):
        client.start()
        assert bundle_server.held.wait(30)
        board = TransferBoard(con, clock=clock, plain_every=10)
        board.update(node_rows(bundle_server.snapshot(), time.monotonic()))
        clock.now += 5
        board.update(node_rows(bundle_server.snapshot(), time.monotonic()))  # within 10 s: no line
        clock.now += 5
        board.update(node_rows(bundle_server.snapshot(), time.monotonic()))
        bundle_server.release()
        client.join(30)
        assert fetch(bundle_server) == 3 << 20
        assert bundle_server.snapshot()[-1].ended.wait(30)
        clock.now += 10
        board.update(node_rows(bundle_server.snapshot(), time.monotonic()))  # none under way: no line
    assert got == [1 << 20]
    text = out.getvalue()
    assert ESC not in text
    under_way = re.compile(rf"    127\.0\.0\.1 {MAC}: root\.img 1\.0 MiB of 3\.0 MiB \(33%\), \d+\.\d MiB/s, "
                           r"(\d+ s|\d+:\d\d) left")
    assert len([line for line in text.splitlines() if under_way.fullmatch(line)]) == 2
    assert f"  {MAC} 127.0.0.1: root.img broken off after 1048576 of 3145728 bytes" in text
    assert re.search(rf"^  {MAC} 127\.0\.0\.1: root\.img sent, 3145728 bytes in \d+\.\d s$", text, re.M)


def test_pxe_transfers_as_a_live_table_on_a_terminal(bundle_server: BundleServer) -> None:
    assert fetch(bundle_server) == 3 << 20
    transfer = bundle_server.snapshot()[-1]
    assert transfer.ended.wait(30)
    with stderr(tty=True) as (con, out):
        with TransferBoard(con) as board:
            assert board.live
            board.update(node_rows(bundle_server.snapshot(), time.monotonic()))
        text = out.getvalue()
    assert f"{ESC}[" in text
    row = re.search(rf"127\.0\.0\.1 {MAC} +root\.img +3\.0 MiB of 3\.0 MiB +100% +[\d.]+ MiB/s +done", text)
    assert row, text
    assert node_rows(bundle_server.snapshot(), time.monotonic() + 60)[0].seconds == \
        pytest.approx(transfer.finished - transfer.started)  # a finished transfer's rate stays what it was
