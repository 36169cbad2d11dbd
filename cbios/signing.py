"""Signed manifests: an Ed25519 key (PEM) signs manifest.json; its public half goes into the
firmware and its initrd, which then write only firmware that key signed. Every build is
signed: a profile that names no key (update.signing_key) is signed with a key made for it
on this machine, kept out of every artifact in .cache/keys/."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from cbios.errors import StepError
from cbios.node import contract
from cbios.profile import Profile
from cbios.project import Project

log = logging.getLogger("cbios")

NODE_KEY = str(contract.UPDATE_KEY).lstrip("/")  # in the root and the initrd, where `cbios update` and the flasher look


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


def key_of(project: Project, profile: Profile) -> Path:
    """The private key that signs PROFILE's builds: the profile's, or one made for it here."""
    if profile.update.signing_key:
        return project.root / profile.update.signing_key
    key = project.cache / "keys" / f"{profile.name}-signing.pem"
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = key.with_name(key.name + ".tmp")
        tmp.unlink(missing_ok=True)
        old = os.umask(0o077)
        try:
            _openssl(["genpkey", "-algorithm", "ed25519", "-out", str(tmp)], f"signing key {key}")
        finally:
            os.umask(old)
        tmp.replace(key)
        log.warning("‣ %s names no update.signing_key: its builds are signed with %s, made on this machine "
                    "(nodes flashed with them take updates signed by it only)", profile.name, project.display(key))
    return key
