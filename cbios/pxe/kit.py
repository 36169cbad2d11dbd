"""The field kit's command line (`python3 KIT ...`): check a kit, show what it holds, serve
its bundle to the nodes on one interface exactly as `cbios pxe serve` does. It runs where
there is python3 and nothing of ours: no checkout, no venv, no openssl (the signature is
checked in pure Python).

Standard library only: the kit carries it (its __main__ calls main)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cbios.errors import CbiosError
from cbios.node import ed25519, pipes
from cbios.pxe import bundle, service
from cbios.pxe.kitfile import KEY, Kit, KitServer, key_der

log = logging.getLogger("cbios")

PROG = "cbios-kit"


def _key(kit: Kit, pem: str | None) -> tuple[bytes, str]:
    """The key that must have signed the manifest (DER), and where it comes from."""
    if pem is None:
        return kit.key(), f"the kit's ({KEY})"
    try:
        text = Path(pem).read_bytes()
    except OSError as e:
        raise CbiosError(f"--key {pem}: {e.strerror}") from None
    return key_der(text, f"--key {pem}"), pem


def cmd_check(args: argparse.Namespace, kit: Kit) -> int:
    key, source = _key(kit, args.key)
    print(f"key {ed25519.fingerprint(key)}, {source}: compare it with the one the release engineer published",
          flush=True)
    data = kit.check_signature(key)
    print(f"manifest.json: signature good: CBIOS {data['profile']} {data['version']}", flush=True)
    bundle.check_members(kit, data, lambda name, size: print(f"{name}: {_size(size)}, sha256 good", flush=True))
    print(f"good: this kit is whole and serves CBIOS {data['profile']} {data['version']}, as signed"
          + (" (a TEST firmware: never for real nodes)" if data.get("test") else ""))
    # This is the kit's own code speaking: a forged kit could print the same.
    print("that the kit is the release engineer's, only 'sha256sum KIT' against the value published "
          "with it shows")
    return 0


def cmd_info(args: argparse.Namespace, kit: Kit) -> int:
    data = kit.manifest()
    files = {name: span.size for name, span in kit.spans.items() if name != KEY}
    size, key = kit.path.stat().st_size, ed25519.fingerprint(kit.key())
    if args.json:
        print(json.dumps({"profile": data.get("profile"), "version": data.get("version"),
                          "test": bool(data.get("test")), "kit": str(kit.path),
                          "kit_size": size, "bundle_size": sum(files.values()), "files": files,
                          "key_fingerprint": key}, indent=2))
        return 0
    print(f"CBIOS {data.get('profile')} {data.get('version')}" + (" (TEST firmware)" if data.get("test") else "")
          + f": field kit {kit.path} ({_size(size)}; the bundle {_size(sum(files.values()))})")
    print(f"  key {key} (not checked here: 'check' does)")
    for name, size in files.items():
        print(f"  {name:18} {_size(size)}")
    return 0


def cmd_serve(args: argparse.Namespace, kit: Kit) -> int:
    service.check_mode(args.mode)
    key, source = _key(kit, args.key)
    log.info("‣ Checking %s with key %s, %s ...", kit.path, ed25519.fingerprint(key), source)
    data = kit.check(key)
    receipts = Path(args.receipts) if args.receipts else kit.path.resolve().parent / service.RECEIPTS

    def make_server(address: tuple[str, int], receipts: Path, mode: str | None) -> KitServer:
        return KitServer(address, kit, receipts, preset_mode=mode)

    return service.run(make_server, profile=str(data["profile"]), version=str(data["version"]),
                       interface=args.interface, http_port=args.http_port, receipts=receipts, mode=args.mode)


def _size(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB" if size >= 1 << 20 else f"{size} bytes"


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="A CBIOS field kit: one file that serves a signed firmware "
                                "bundle to nodes over PXE, on a machine with python3, dnsmasq-base and ipxe.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("check", help="verify the manifest's signature and every file against it",
                       description="Verify the manifest's Ed25519 signature and each file's size and sha256 "
                                   "against it; print the key's fingerprint to compare with the published one.")
    c.add_argument("--key", metavar="PEMFILE", help="verify with this public key instead of the kit's own")
    c.set_defaults(func=cmd_check)
    i = sub.add_parser("info", help="profile, version, sizes, key fingerprint (nothing verified)")
    i.add_argument("--json", action="store_true", help="as JSON")
    i.set_defaults(func=cmd_info)
    s = sub.add_parser("serve", help="proxy-DHCP, TFTP (iPXE) and HTTP for the nodes on one interface (as root)",
                       description="Check the kit, then serve its bundle on the nodes' network until Ctrl-C. The "
                                   "site's DHCP server keeps giving addresses.")
    s.add_argument("--interface", required=True, metavar="IF", help="the interface on the nodes' network")
    s.add_argument("--http-port", type=int, default=8080, metavar="PORT", help="HTTP port (default 8080)")
    s.add_argument("--mode", choices=list(service.MODES),
                   help="what every node does, with no menu (default: iPXE's menu, which boots after 10 s)")
    s.add_argument("--receipts", metavar="DIR", help="where the flasher's receipts go (default: receipts/ beside "
                                                     "the kit)")
    s.add_argument("--key", metavar="PEMFILE", help="check with this public key instead of the kit's own")
    s.set_defaults(func=cmd_serve)
    return p


def reporting(call: Callable[[], int]) -> int:
    """CALL's status; a CbiosError as one line (no traceback), and a closed pipe as nothing
    (status 0, as `cbios`)."""
    try:
        return pipes.quietly(call)
    except CbiosError as e:
        print(f"{PROG}: {e.message}" + (f" (hint: {e.hint})" if e.hint else ""), file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None, kit: Path | None = None) -> int:
    """The kit's command line; KIT: the kit file (default: the program run, sys.argv[0])."""
    path = kit or Path(sys.argv[0])
    args = pipes.parsed(lambda: parser(f"python3 {path.name}").parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return reporting(lambda: int(args.func(args, Kit(path))))
