"""`cbios status`: which copy runs, the versions of both, tries left, the last fallback."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from cbios.node.boot import bootenv

RELEASE = Path("/usr/lib/cbios/release")
FLASH_FIELDS = ("result", "mode", "profile", "version", "previous", "copies", "reason", "finished", "bytes_received")


def release(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def copy_release(vg: str, lv: str) -> dict[str, str] | None:
    """The release file inside an LV's squashfs image, read without mounting it."""
    proc = subprocess.run(["unsquashfs", "-cat", f"/dev/{vg}/{lv}", str(RELEASE)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    found = release(proc.stdout) if proc.returncode == 0 else {}
    return found or None


def gather(env: dict[str, str] | None, running: str | None, own: dict[str, str],
           booted_from: str = "disk", receipt: dict[str, Any] | None = None) -> dict[str, Any]:
    vg = own.get("CBIOS_VG", "lvm")
    copies = {}
    for copy, lv in bootenv.COPIES.items():
        rel = copy_release(vg, lv) if env is not None else None
        copies[copy] = {
            "lv": f"{vg}/{lv}",
            "version": rel.get("CBIOS_VERSION") if rel else None,
            "profile": rel.get("CBIOS_PROFILE") if rel else None,
            "state": (env or {}).get(f"cbios_{copy}_state") or None,
            "tries_left": (env or {}).get(f"cbios_{copy}_tries") or None,
            "running": copy == running,
        }
    return {
        "profile": own.get("CBIOS_PROFILE"),
        "version": own.get("CBIOS_VERSION"),
        "object_id": own.get("CBIOS_OBJECT_ID"),
        "running": running,
        "booted_from": booted_from if running is not None or booted_from == bootenv.DISKLESS else None,
        "next_boot": (env or {}).get("cbios_active") or None,
        "last_fallback": (env or {}).get("cbios_fallback") or None,
        "last_failure": (env or {}).get("cbios_failure") or None,
        "last_corruption": (env or {}).get("cbios_corrupt") or None,
        "refused_versions": bootenv.refused(env or {}),
        "last_flash": {k: receipt.get(k) for k in FLASH_FIELDS} if receipt else None,
        "copies": copies if env is not None else {},
    }


def render_text(st: dict[str, Any]) -> str:
    lines = [f"CBIOS {st['profile']} {st['version']}, node {st['object_id']}"]
    if st["booted_from"] == bootenv.DISKLESS:
        lines.append(f"booted from:   {st['booted_from']}: the firmware runs from RAM, no disk is used")
        return "\n".join(lines) + "\n"
    if st["running"] is None:
        lines.append("running from an image, not from a node disk: no copies, no boot state")
        return "\n".join(lines) + "\n"
    rows = [["copy", "LV", "version", "state", "tries", ""]]
    for copy, c in st["copies"].items():
        rows.append([copy, c["lv"], c["version"] or "unreadable", c["state"] or "-", c["tries_left"] or "-",
                     "(running)" if c["running"] else ""])
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(len(rows[0]))]
    lines += ["".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(f"booted from:   {st['booted_from']}")
    lines.append(f"next boot:     {st['next_boot']}")
    lines.append(f"last fallback: {st['last_fallback'] or 'none'}")
    lines.append(f"last failure:  {st['last_failure'] or 'none'}")
    lines.append(f"corruption:    {st['last_corruption'] or 'none'}")
    if flash := st["last_flash"]:
        lines.append(f"last flash:    {flash['result']} {flash['mode']} {flash['profile']} {flash['version']}"
                     f" at {flash['finished']}" + (f": {flash['reason']}" if flash["reason"] else ""))
    if st["refused_versions"]:
        lines.append(f"refused:       {' '.join(st['refused_versions'])} (failed here; cbios update --force)")
    return "\n".join(lines) + "\n"
