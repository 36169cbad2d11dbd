"""The field kit: `cbios pxe pack` writes it; `python3 -I KIT check|info` runs it where the
cbios package cannot be imported; its Ed25519 verification against openssl's signatures."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cbios import manifest, signing
from cbios.cli import main
from cbios.errors import CbiosError
from cbios.node import ed25519
from cbios.profile import load_profile
from cbios.project import Project
from cbios.pxe.bundle import FILES, make_bundle
from cbios.pxe.kitfile import Kit, KitServer
from cbios.pxe.pack import SUFFIX, pack
from tests.unit.test_pxe_bundle import fake_build, request

PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").is_file() else sys.executable
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}  # no PYTHONPATH, no venv
REPO = Path(__file__).resolve().parents[2]


def openssl(*argv: str) -> bytes:
    return subprocess.run(["openssl", *argv], check=True, capture_output=True, stdin=subprocess.DEVNULL).stdout


def new_key(where: Path, name: str = "signing") -> tuple[Path, Path]:
    """A fresh Ed25519 key pair: (private PEM, public PEM)."""
    private, public = where / f"{name}.pem", where / f"{name}.pub.pem"
    openssl("genpkey", "-algorithm", "ed25519", "-out", str(private))
    public.write_bytes(signing.public_key(private))
    return private, public


def signed_build(out: Path) -> tuple[Path, Path]:
    """fake_build's files with a real signature, and its bundle: (bundle, public key PEM)."""
    fake_build(out)
    private, public = new_key(out.parent)
    signing.sign(private, out / manifest.MANIFEST)
    return make_bundle(out), public


def run_kit(kit: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """python3 -I KIT ARGS as on a laptop: a clean environment, from a folder of no project."""
    return subprocess.run([PYTHON, "-I", str(kit), *args], capture_output=True, text=True, cwd=cwd, env=CLEAN_ENV,
                          timeout=60, check=False, stdin=subprocess.DEVNULL)


@pytest.fixture
def kit(tmp_path: Path) -> Path:
    bundle, public = signed_build(tmp_path / "build")
    return pack(bundle, public.read_bytes())


def laptop_in(where: Path) -> Path:
    """WHERE, made a folder to run the kit from; the cbios package cannot be imported there."""
    where.mkdir(exist_ok=True)
    proc = subprocess.run([PYTHON, "-I", "-c", "import cbios"], capture_output=True, text=True, cwd=where,
                          env=CLEAN_ENV, check=False)
    assert proc.returncode == 1 and "No module named 'cbios'" in proc.stderr
    return where


@pytest.fixture
def laptop(tmp_path: Path) -> Path:
    return laptop_in(tmp_path / "laptop")


def span_of(kit: Path, name: str) -> tuple[int, int]:
    span = Kit(kit).spans[name]
    return span.offset, span.size


def test_the_kit_checks_itself_where_cbios_cannot_be_imported(kit: Path, laptop: Path, tmp_path: Path) -> None:
    assert kit == tmp_path / "build" / f"qemu-test-1.0.0{SUFFIX}" and os.access(kit, os.X_OK)
    proc = run_kit(kit, "check", cwd=laptop)
    assert proc.returncode == 0, proc.stderr
    der = openssl("pkey", "-pubin", "-in", str(tmp_path / "build" / ".." / "signing.pub.pem"), "-outform", "DER")
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"key sha256:{hashlib.sha256(der).hexdigest()}, the kit's")
    assert "root.img: 3.0 MiB, sha256 good" in lines
    assert lines[-2:] == ["good: this kit is whole and serves CBIOS qemu-test 1.0.0, as signed",
                          "that the kit is the release engineer's, only 'sha256sum KIT' against the value "
                          "published with it shows"]
    assert not list(kit.parent.glob(".*.tmp"))


def test_info_says_what_the_kit_holds_and_the_kit_is_about_the_bundles_size(kit: Path, laptop: Path) -> None:
    proc = run_kit(kit, "info", "--json", cwd=laptop)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    bundle = kit.parent / "pxe"
    assert (info["profile"], info["version"]) == ("qemu-test", "1.0.0")
    assert info["files"] == {name: (bundle / name).stat().st_size for name in FILES}
    assert info["kit_size"] == kit.stat().st_size
    assert 0 < info["kit_size"] - info["bundle_size"] < 64 << 10  # the bundle, stored, and the server's modules
    assert info["key_fingerprint"] == ed25519.fingerprint(Kit(kit).key())


def test_the_kit_serves_each_file_from_where_it_is_in_the_kit(kit: Path, tmp_path: Path) -> None:
    bundle = kit.parent / "pxe"
    server = KitServer(("127.0.0.1", 0), Kit(kit), tmp_path / "receipts", preset_mode="install")
    server.start()
    try:
        status, data, _ = request(server, "GET", "/root.img")
        assert status == 200 and data == (bundle / "root.img").read_bytes()
        status, data, headers = request(server, "GET", "/root.img", headers={"Range": "bytes=1000-1999"})
        assert (status, data) == (206, (bundle / "root.img").read_bytes()[1000:2000])
        assert headers["Content-Range"] == f"bytes 1000-1999/{(bundle / 'root.img').stat().st_size}"
        status, data, _ = request(server, "GET", "/boot.ipxe", headers={"Host": "10.0.2.100"})
        assert data.decode().splitlines() == ["#!ipxe", "set cbios-server http://10.0.2.100/", "set cbios-mode install",
                                              "echo hello"]
        for path in ("/update-key.pem", "/bundle/root.img", "/__main__.py", "/cbios/pxe/kit.py"):
            assert request(server, "GET", path)[0] == 404, path
    finally:
        server.stop()


def test_every_module_in_the_kit_imports_with_the_standard_library_alone(kit: Path, laptop: Path) -> None:
    with zipfile.ZipFile(kit) as archive:
        modules = [n.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for n in archive.namelist()
                   if n.startswith("cbios/") and n.endswith(".py")]
    assert "cbios.pxe.kit" in modules and "cbios.pxe.service" in modules and "cbios.node.ed25519" in modules
    code = ("import importlib, json, sys; sys.path.insert(0, sys.argv[1]); "
            "[importlib.import_module(m) for m in sys.argv[2:]]; "
            "print(json.dumps({n: getattr(m, '__file__', None) for n, m in sys.modules.items() "
            "if n.split('.')[0] not in sys.stdlib_module_names}))")
    # -S as well: not even the site's packages; what is not the kit's is the standard library.
    proc = subprocess.run([PYTHON, "-I", "-S", "-c", code, str(kit), *modules], capture_output=True, text=True,
                          cwd=laptop, env=CLEAN_ENV, check=False)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert set(loaded) - {"__main__"} == set(modules)
    assert all(str(file).startswith(f"{kit}/") for name, file in loaded.items() if name != "__main__")


@pytest.mark.parametrize("name, old, new, message", [
    ("root.img", None, None, "root.img: does not match its sha256 in the manifest"),
    (manifest.MANIFEST, b'"1.0.0"', b'"1.0.1"', "manifest.json: its signature does not verify with key sha256:"),
])
def test_a_tampered_kit_fails_its_check_in_one_line(kit: Path, laptop: Path, name: str, old: bytes | None,
                                                     new: bytes | None, message: str) -> None:
    offset, size = span_of(kit, name)
    with open(kit, "r+b") as f:
        f.seek(offset)
        data = f.read(size)
        changed = data.replace(old, new) if old and new else data[:100] + bytes([data[100] ^ 1]) + data[101:]
        assert changed != data and len(changed) == size
        f.seek(offset)
        f.write(changed)
    for command in ("check", "serve --interface lo"):
        proc = run_kit(kit, *command.split(), cwd=laptop)
        assert proc.returncode == 2, command
        [line] = proc.stderr.splitlines()[-1:]
        assert line.startswith(f"cbios-kit: {kit}: {name}") and message in line, line
        assert "Traceback" not in proc.stderr and "Serving" not in proc.stderr


def test_a_key_held_apart_decides_and_a_wrong_one_is_refused(kit: Path, laptop: Path, tmp_path: Path) -> None:
    proc = run_kit(kit, "check", "--key", str(tmp_path / "signing.pub.pem"), cwd=laptop)
    assert proc.returncode == 0 and f", {tmp_path / 'signing.pub.pem'}:" in proc.stdout.splitlines()[0]
    _, other = new_key(tmp_path, "other")
    proc = run_kit(kit, "check", "--key", str(other), cwd=laptop)
    assert proc.returncode == 2 and "its signature does not verify" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    proc = run_kit(kit, "check", "--key", str(tmp_path / "signing.pem"), cwd=laptop)  # a private key
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"cbios-kit: --key {tmp_path / 'signing.pem'}: holds a private key "
        "(hint: give the public key alone: openssl pkey -in KEY -pubout)"]


def test_a_damaged_kit_is_refused_in_one_line(kit: Path, laptop: Path) -> None:
    with zipfile.ZipFile(kit) as archive:
        header = archive.getinfo("bundle/root.img").header_offset
    with open(kit, "r+b") as f:  # what python3 needs of the kit is whole; root.img's header is not
        f.seek(header)
        f.write(b"PK\x00\x00")
    proc = run_kit(kit, "check", cwd=laptop)
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [
        f"cbios-kit: {kit}: not a field kit, or a damaged one (no local header for bundle/root.img)"])


def test_a_closed_pipe_ends_the_kit_quietly(kit: Path, laptop: Path) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the kit writes a byte
    proc = subprocess.run([PYTHON, "-I", str(kit), "info", "--json"], stdout=write, stderr=subprocess.PIPE,
                          text=True, cwd=laptop, env=CLEAN_ENV, timeout=60, check=False)
    os.close(write)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_pack_refuses_a_bundle_its_key_does_not_verify_and_leaves_the_old_kit(tmp_path: Path) -> None:
    bundle = make_bundle(fake_build(tmp_path / "build"))  # signed with b"signature"
    _, public = new_key(tmp_path)
    dest = tmp_path / "kit.pyz"
    dest.write_bytes(b"the kit before")
    with pytest.raises(CbiosError, match="its signature does not verify"):
        pack(bundle, public.read_bytes(), dest)
    assert dest.read_bytes() == b"the kit before" and sorted(p.name for p in tmp_path.iterdir()) == [
        "build", "kit.pyz", "signing.pem", "signing.pub.pem"]


def test_cbios_pxe_pack_names_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle, public = signed_build(tmp_path / "build")
    assert main(["pxe", "pack", "--bundle", str(bundle), "--key", str(public), "-o", str(tmp_path / "k.pyz")]) == 0
    assert Kit(tmp_path / "k.pyz").check(Kit(tmp_path / "k.pyz").key())["version"] == "1.0.0"
    assert main(["pxe", "pack", "--bundle", str(tmp_path / "nonesuch"), "--key", str(public)]) == 2
    assert main(["pxe", "pack", "--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-3].startswith(f"cbios: {tmp_path / 'nonesuch'}: not a PXE bundle")
    assert err[-1] == "cbios: pxe pack --bundle: name the public key that verifies its manifest: --key PEMFILE"


# -- Ed25519 -------------------------------------------------------------------------

RFC8032 = [  # section 7.1, tests 1 and 2: public key, message, signature
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24"
     "655141438e7a100b"),
    ("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aee"
     "b00d291612bb0c00"),
]


@pytest.mark.parametrize("public, message, signature", RFC8032)
def test_ed25519_verifies_the_rfcs_vectors(public: str, message: str, signature: str) -> None:
    key, data, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
    assert ed25519.verify(key, data, sig)
    assert not ed25519.verify(key, data + b"x", sig)


def test_ed25519_agrees_with_openssl(tmp_path: Path) -> None:
    private, public = new_key(tmp_path)
    der = ed25519.public_key_der(public.read_text())
    assert der == openssl("pkey", "-pubin", "-in", str(public), "-outform", "DER")
    key = ed25519.raw_key(der)
    _, other = new_key(tmp_path, "other")
    other_key = ed25519.raw_key(ed25519.public_key_der(other.read_text()))
    for size in (1, 31, 64, 1000, 100_000):
        message = tmp_path / "message"
        message.write_bytes(os.urandom(size))
        sig = openssl("pkeyutl", "-sign", "-rawin", "-inkey", str(private), "-in", str(message))
        data = message.read_bytes()
        assert ed25519.verify(key, data, sig), size
        assert not ed25519.verify(key, data[:-1] + bytes([data[-1] ^ 0x80]), sig)  # a tampered message
        assert not ed25519.verify(other_key, data, sig)  # another key
        for i in (0, 31, 32, 63):  # a wrong signature: R or S changed
            assert not ed25519.verify(key, data, sig[:i] + bytes([sig[i] ^ 1]) + sig[i + 1:]), i
        s = int.from_bytes(sig[32:], "little") + ed25519.L  # S past the group's order, though the same mod L
        assert not ed25519.verify(key, data, sig[:32] + s.to_bytes(32, "little"))
        assert not ed25519.verify(key, data, sig[:63])


IDENTITY = (1).to_bytes(32, "little")  # the neutral point's encoding (y = 1)
ORDER_TWO = (2**255 - 19 - 1).to_bytes(32, "little")  # (0, -1)


@pytest.mark.parametrize("public", [IDENTITY, ORDER_TWO], ids=["identity", "order 2"])
def test_ed25519_refuses_a_key_of_small_order(public: bytes) -> None:
    """With such a key, R = [S]B makes a 'signature' of every message (S = 0, R the neutral
    point): it must be no key at all."""
    for message in (b"", b"any manifest"):
        assert not ed25519.verify(public, message, IDENTITY + bytes(32))


def test_ed25519_refuses_an_r_that_is_not_the_signers(tmp_path: Path) -> None:
    """R is compared byte for byte, as OpenSSL (on the node) compares it: the point with the
    other x, or R's y off by one, is refused."""
    private, public = new_key(tmp_path)
    key = ed25519.raw_key(ed25519.public_key_der(public.read_text()))
    message = tmp_path / "message"
    message.write_bytes(b"m")
    sig = openssl("pkeyutl", "-sign", "-rawin", "-inkey", str(private), "-in", str(message))
    assert ed25519.verify(key, b"m", sig)
    r = int.from_bytes(sig[:32], "little")
    sign, y = r >> 255, r & ((1 << 255) - 1)
    assert not ed25519.verify(key, b"m", ((y ^ 1) | sign << 255).to_bytes(32, "little") + sig[32:])
    bad_r = (y | (sign ^ 1) << 255).to_bytes(32, "little")  # the other x: another point
    assert not ed25519.verify(key, b"m", bad_r + sig[32:])


def test_serve_on_a_missing_interface_says_so_in_one_line(kit: Path, laptop: Path) -> None:
    proc = run_kit(kit, "serve", "--interface", "cbios-nonesuch", cwd=laptop)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == (
        "cbios-kit: --interface cbios-nonesuch: no such interface "
        "(hint: 'ip -br addr' lists them; pick the one on the nodes' network)")
    assert len(proc.stderr.splitlines()) == 2 and proc.stderr.startswith("‣ Checking ")


def test_cbios_pxe_pack_of_a_build_carries_its_profiles_key(tmp_project: Project, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cbios")
    monkeypatch.setenv("CBIOS_PROJECT", str(tmp_project.root))
    profile = load_profile(tmp_project, "base")
    out = fake_build(tmp_project.build / "base")
    private = signing.key_of(tmp_project, profile)
    signing.sign(private, out / manifest.MANIFEST)
    make_bundle(out)
    assert main(["pxe", "pack", "--profile", "base"]) == 0
    kit = out / f"qemu-test-1.0.0{SUFFIX}"  # the manifest's profile and version
    assert ed25519.pem(Kit(kit).key()).encode() == signing.public_key(private)
    assert f"key {ed25519.fingerprint(Kit(kit).key())}" in caplog.text
    assert f"sha256 {hashlib.sha256(kit.read_bytes()).hexdigest()}" in caplog.text


def test_pack_never_carries_a_private_key(tmp_path: Path) -> None:
    bundle, public = signed_build(tmp_path / "build")
    both = (tmp_path / "signing.pem").read_bytes() + public.read_bytes()  # passes for a public key's PEM
    with pytest.raises(CbiosError, match="holds a private key"):
        pack(bundle, both)
    kit = pack(bundle, public.read_bytes() + b"# a comment after the key\n")
    with zipfile.ZipFile(kit) as archive:
        assert archive.read("update-key.pem") == public.read_bytes()  # the key checked, written again


def test_a_kit_with_a_name_twice_is_refused(kit: Path) -> None:
    with zipfile.ZipFile(kit, "a") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("bundle/root.img", b"another root", zipfile.ZIP_STORED)
    with pytest.raises(CbiosError, match="a name is in it twice"):
        Kit(kit)


def test_a_kit_serves_the_file_it_checked_even_if_its_path_is_copied_over(kit: Path, tmp_path: Path) -> None:
    opened = Kit(kit)
    before = opened.sha256("root.img")
    kit.unlink()
    kit.write_bytes(b"something else")
    assert opened.sha256("root.img") == before
    f, span = opened.open("root.img")
    with f:
        assert hashlib.sha256(os.pread(f.fileno(), span.size, span.offset)).hexdigest() == before
