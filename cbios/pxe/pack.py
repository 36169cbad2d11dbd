"""`cbios pxe pack`: a bundle, its key and the PXE server in one file, the field kit, for a
laptop that has python3, dnsmasq-base and ipxe and nothing of ours (cbios/pxe/kitfile.py
says how it is laid out, cbios/pxe/kit.py what it does). The kit is about the bundle's size:
the bundle's files are stored as they are, the server's modules add some 30 KiB."""

from __future__ import annotations

import modulefinder
import os
import tempfile
import zipfile
from pathlib import Path

from cbios.errors import CbiosError
from cbios.node import ed25519
from cbios.pxe import kit
from cbios.pxe.bundle import FILES, check_bundle
from cbios.pxe.kitfile import BUNDLE, KEY, Kit, key_der

SUFFIX = ".cbios-kit.pyz"
SHEBANG = b"#!/usr/bin/env python3\n"
MAIN = "import sys\n\nfrom cbios.pxe.kit import main\n\nsys.exit(main())\n"
ROOT = Path(__file__).resolve().parents[2]  # where the cbios package is


def kit_modules() -> dict[str, Path]:
    """The modules of this package that the kit's program imports, as paths in the kit: only
    those (the rest of cbios needs more than the standard library)."""
    finder = modulefinder.ModuleFinder(path=[str(ROOT)])  # what is found here is ours; the rest is stdlib
    finder.run_script(str(Path(kit.__file__)))
    found = (Path(file) for m in finder.modules.values() if (file := getattr(m, "__file__", None)))
    return {path.relative_to(ROOT).as_posix(): path for path in found if path.is_relative_to(ROOT / "cbios")}


def pack(bundle: Path, key_pem: bytes, dest: Path | None = None, *, key_source: str = "the key") -> Path:
    """The kit of BUNDLE, whose manifest KEY_PEM (a public key, from KEY_SOURCE) verifies,
    written whole or not at all (default: PROFILE-VERSION.cbios-kit.pyz beside the bundle)."""
    data = check_bundle(bundle)
    key = key_der(key_pem, key_source)
    dest = dest or bundle.resolve().parent / f"{data['profile']}-{data['version']}{SUFFIX}"
    try:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as e:
        raise CbiosError(f"{dest}: cannot write there ({e.strerror})") from None
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(SHEBANG)
            with zipfile.ZipFile(f, "w") as archive:
                archive.writestr("__main__.py", MAIN, zipfile.ZIP_DEFLATED)
                for arcname, path in sorted(kit_modules().items()):
                    archive.write(path, arcname, zipfile.ZIP_DEFLATED)
                archive.writestr(KEY, ed25519.pem(key), zipfile.ZIP_STORED)  # the key checked, and only it
                for file in FILES:  # stored: served from where they are in the kit
                    archive.write(bundle / file, BUNDLE + file, zipfile.ZIP_STORED)
        Kit(tmp).check(key)  # what the laptop will check, before the kit is anywhere to be found
        tmp.chmod(0o755)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
