"""Running mkosi on one rendered image configuration.

Machine-specific paths (output, caches, extra trees) go on the command line, so the
rendered configuration depends on the profile alone and can be compared with golden files."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cbios.progress import StatusLine
from cbios.run import complete_step, run

STEP_MARK = "‣"  # mkosi 24 starts the line of each step it begins with it
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass(frozen=True)
class MkosiImage:
    name: str  # "initrd" or "root"
    config_dir: Path  # the rendered mkosi.conf and mkosi.pkgmngr/
    output_dir: Path
    cache_dir: Path  # mkosi's incremental images for this profile and image
    package_cache_dir: Path  # downloaded packages, shared by every build


def build(image: MkosiImage, *, log_file: Path, extra_trees: Sequence[Path] = (),
          initrds: Sequence[Path] = (), source_date_epoch: int | None = None) -> None:
    for d in (image.output_dir, image.cache_dir, image.package_cache_dir):
        d.mkdir(parents=True, exist_ok=True)
    argv: list[str | os.PathLike[str]] = [
        "mkosi",
        "--directory", image.config_dir,
        "--output-dir", image.output_dir,
        "--cache-dir", image.cache_dir,
        "--package-cache-dir", image.package_cache_dir,
    ]
    for tree in extra_trees:
        argv += ["--extra-tree", tree]
    for initrd in initrds:
        argv += ["--initrd", initrd]
    if source_date_epoch is not None:
        argv += ["--source-date-epoch", str(source_date_epoch)]
    argv += ["--force", "build"]
    with complete_step(f"Building the {image.name} image with mkosi (log: {log_file})"), \
            StatusLine(f"mkosi {image.name}") as status:
        run(argv, step=f"mkosi {image.name}", log_file=log_file, on_line=lambda line: show_step(status, line))


def step_of(line: str) -> str | None:
    """The step a line of mkosi's output begins ("‣  Installing Debian": "Installing Debian"), or None."""
    line = ESCAPE.sub("", line)
    if not line.startswith(STEP_MARK):
        return None
    return line.removeprefix(STEP_MARK).strip() or None


def show_step(status: StatusLine, line: str) -> None:
    if (step := step_of(line)) is not None:
        status.note(step)


def packages(manifest: Path) -> list[dict[str, str]]:
    """The (name, version) of every package mkosi recorded in its JSON manifest."""
    data = json.loads(manifest.read_text())
    out = [{"name": p["name"], "version": p["version"]} for p in data.get("packages", [])]
    return sorted(out, key=lambda p: p["name"])
