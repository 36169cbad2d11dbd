"""Where the project's inputs and outputs live."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Project:
    root: Path
    build_dir: Path | None = None  # else $CBIOS_BUILD_DIR, else ROOT/build

    @classmethod
    def find(cls) -> Project:
        """$CBIOS_PROJECT, else the checkout this package was installed from, else the cwd."""
        if env := os.environ.get("CBIOS_PROJECT"):
            return cls(Path(env).resolve())
        here = Path(__file__).resolve().parents[1]
        if (here / "profiles").is_dir():
            return cls(here)
        return cls(Path.cwd())

    @property
    def profiles(self) -> Path:
        return self.root / "profiles"

    @property
    def overlays(self) -> Path:
        return self.root / "overlays"

    @property
    def test_keys(self) -> Path:
        """The test profiles' keys: public on purpose, never a real node's."""
        return self.profiles / "keys"

    @property
    def initrd(self) -> Path:
        return self.root / "initrd"

    @property
    def slot_templates(self) -> Path:
        return self.root / "slot-templates"

    @property
    def build(self) -> Path:
        if self.build_dir is not None:
            return self.build_dir
        return Path(os.environ.get("CBIOS_BUILD_DIR", self.root / "build"))

    @property
    def cache(self) -> Path:
        """Package cache and mkosi's incremental images: kept across 'make clean'."""
        return Path(os.environ.get("CBIOS_CACHE_DIR", self.root / ".cache"))

    def display(self, path: Path) -> str:
        """A path as a person would type it: relative to the cwd where possible."""
        try:
            return str(path.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(path)
