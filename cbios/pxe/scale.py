"""PXE at scale, measured: N nodes fetching a bundle at once from the project's HTTP server
(`cbios pxe publish`: the HTTP side of `cbios pxe serve`) and from a stock nginx serving the
same files, in the same run, on this machine's loopback.

Each client is a real one, with a node's requests in its order: iPXE's (boot.ipxe, vmlinuz,
initrd.img), then the flasher's (manifest.json, its signature, grub.cfg, and root.img
streamed through tee into sha256sum, as the flasher streams it into its LVs), all with curl
as the flasher runs it. Figures, never assertions: aggregate and per-client throughput, the
slowest client against the mean, failures."""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cbios import manifest, ports
from cbios.pxe.bundle import PXE_DIR
from cbios.pxe.nginx import Nginx

log = logging.getLogger("cbios")

COUNTS = (1, 10, 50, 100)
CLIENT_TIMEOUT = 900
# One node: iPXE's files, then the flasher's, root.img hashed as it arrives. Prints its
# seconds, the bytes of root.img and their sha256.
CLIENT = r"""
set -o pipefail
url=$1 mac=$2
start=$(date +%s.%N)
for f in boot.ipxe vmlinuz initrd.img manifest.json manifest.json.sig grub.cfg; do
    curl -fsS --connect-timeout 10 -o /dev/null "$url/$f?mac=$mac" || exit 1
done
sum=$(curl -fsS --connect-timeout 10 --speed-time 30 --speed-limit 1024 -w '%{stderr}%{size_download}\n' \
    "$url/root.img?mac=$mac" 2>"$3" | tee /dev/null | sha256sum | cut -d' ' -f1) || exit 1
echo "$(date +%s.%N) $start $(tail -n 1 "$3") $sum"
"""


@contextmanager
def project_server(bundle: Path) -> Iterator[str]:
    """`cbios pxe publish` of BUNDLE, in a process of its own, as a site runs it; its URL."""
    port = ports.free_port()
    argv = [sys.executable, "-c", "import sys; from cbios.cli import main; sys.exit(main())",
            "pxe", "publish", "--bundle", str(bundle), "--port", str(port)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ports.wait_listening(proc, port, 30, "cbios pxe publish")
        yield f"http://127.0.0.1:{port}"
    finally:
        ports.end(proc)


@contextmanager
def nginx_server(bundle: Path, workdir: Path) -> Iterator[str]:
    """Debian's nginx serving BUNDLE as plain files, one worker a core as a site runs it."""
    with Nginx(bundle, workdir, workers="auto") as server:
        yield f"http://127.0.0.1:{server.port}"


def clients(url: str, count: int, expected: str, size: int, workdir: Path) -> dict[str, Any]:
    """COUNT nodes at once against URL; their figures."""
    procs = []
    started = time.time()
    for i in range(count):
        mac = f"52:54:00:5c:{i >> 8:02x}:{i & 0xff:02x}"
        procs.append(subprocess.Popen(["bash", "-c", CLIENT, "client", url, mac, str(workdir / f"client{i}.err")],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True))
    seconds, failures, ended = [], 0, started
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failures += 1
            continue
        parts = out.split()
        if proc.returncode != 0 or len(parts) != 4 or parts[2] != str(size) or parts[3] != expected:
            failures += 1
            continue
        ended = max(ended, float(parts[0]))
        seconds.append(float(parts[0]) - float(parts[1]))
    wall = ended - started
    mean = statistics.fmean(seconds) if seconds else 0.0
    return {
        "clients": count,
        "failures": failures,
        "wall_s": round(wall, 2),
        "aggregate_MBps": round(len(seconds) * size / wall / 1e6, 1) if seconds and wall else 0.0,
        "per_client_MBps_mean": round(statistics.fmean(size / s / 1e6 for s in seconds), 1) if seconds else 0.0,
        "mean_s": round(mean, 2),
        "slowest_s": round(max(seconds), 2) if seconds else None,
        "slowest_over_mean": round(max(seconds) / mean, 2) if seconds and mean else None,
    }


def measure(bundle: Path, counts: tuple[int, ...] = COUNTS) -> dict[str, Any]:
    """The figures of both servers at every count, taken in turn (never both at once)."""
    root = manifest.read(bundle / manifest.MANIFEST)["artifacts"]["root.img"]
    figures: dict[str, Any] = {"root_img_bytes": root["size"], "cbios": [], "nginx": []}
    with tempfile.TemporaryDirectory(prefix="cbios-pxe-scale-") as tmp:
        work = Path(tmp)
        for count in counts:
            for name in ("cbios", "nginx"):
                server = project_server(bundle) if name == "cbios" else nginx_server(bundle, work / "nginx")
                with server as url:
                    row = clients(url, count, root["sha256"], root["size"], work)
                figures[name].append(row)
                log.info("  %-5s %3d clients: %s", name, count, json.dumps(row))
        figures["cbios_over_nginx"] = [round(a["aggregate_MBps"] / b["aggregate_MBps"], 2) if b["aggregate_MBps"]
                                       else None for a, b in zip(figures["cbios"], figures["nginx"], strict=True)]
    return figures


def run_scale(profile_name: str, counts: tuple[int, ...] = COUNTS) -> dict[str, Any]:
    """Build PROFILE if needed, measure its bundle, write build/PROFILE/pxe-scale.json."""
    from cbios.build import build
    from cbios.profile import load_profile
    from cbios.project import Project

    project = Project.find()
    out = build(project, load_profile(project, profile_name))
    log.info("‣ PXE at scale: %s's bundle, %s nodes at once, cbios pxe publish and nginx in turn",
             profile_name, ", ".join(map(str, counts)))
    figures = measure(out / PXE_DIR, counts)
    (out / "pxe-scale.json").write_text(json.dumps(figures, indent=2) + "\n")
    log.info("‣ Written: %s", out / "pxe-scale.json")
    return figures
