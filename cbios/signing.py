"""Signed manifests: an Ed25519 key (PEM) named by the profile signs manifest.json; its
public half goes into the firmware, which then takes only updates that key signed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cbios.errors import StepError

NODE_KEY = "usr/lib/cbios/update-key.pem"  # in the root, where `cbios update` looks


def _openssl(args: list[str], step: str) -> bytes:
    try:
        proc = subprocess.run(["openssl", *args], capture_output=True, stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise StepError(step, "openssl is not installed (make deps)") from None
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
        raise StepError(step, last)
    return proc.stdout


def public_key(private: Path) -> bytes:
    """The PEM public key of PRIVATE, which must be an Ed25519 key."""
    text = _openssl(["pkey", "-in", str(private), "-text_pub", "-noout"], f"signing key {private}")
    if not text.startswith(b"ED25519"):
        raise StepError(f"signing key {private}", "not an Ed25519 key (openssl genpkey -algorithm ed25519)")
    return _openssl(["pkey", "-in", str(private), "-pubout"], f"signing key {private}")


def sign(private: Path, path: Path) -> Path:
    """PATH.sig: the raw Ed25519 signature of PATH."""
    sig = path.with_name(path.name + ".sig")
    tmp = sig.with_name(sig.name + ".tmp")
    _openssl(["pkeyutl", "-sign", "-rawin", "-inkey", str(private), "-in", str(path), "-out", str(tmp)],
             f"signing {path.name}")
    tmp.replace(sig)
    return sig
