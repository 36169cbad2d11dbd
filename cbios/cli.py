"""The `cbios` command: profiles, builds and boots for release engineers."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from cbios import __version__
from cbios.errors import CbiosError, ProfileError
from cbios.node import contract
from cbios.project import Project

if TYPE_CHECKING:
    from cbios.profile import Profile

log = logging.getLogger("cbios")


def _profile(project: Project, name: str) -> Profile:
    from cbios.profile import load_profile

    return load_profile(project, name)


def cmd_profile_list(args: argparse.Namespace, project: Project) -> int:
    from cbios.profile import available

    for name in available(project):
        print(name)
    return 0


def cmd_profile_show(args: argparse.Namespace, project: Project) -> int:
    profile = _profile(project, args.name)
    data = profile.model_dump(mode="json")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")
    return 0


def cmd_profile_schema(args: argparse.Namespace, project: Project) -> int:
    from cbios.profile import load_schema

    print(json.dumps(load_schema(), indent=2))
    return 0


def cmd_build(args: argparse.Namespace, project: Project) -> int:
    from cbios.build import build

    build(project, _profile(project, args.name), force=args.force)
    return 0


def cmd_boot(args: argparse.Namespace, project: Project) -> int:
    from cbios.boot import boot

    return boot(project, _profile(project, args.name), check=args.check, timeout=args.timeout,
                disk=args.disk, persist=args.persist)


def cmd_disk(args: argparse.Namespace, project: Project) -> int:
    from cbios.disk import make_disk

    make_disk(project, _profile(project, args.name), force=args.force)
    return 0


def cmd_release(args: argparse.Namespace, project: Project) -> int:
    from cbios.artifacts import built
    from cbios.release import write_release

    path = write_release(built(project, _profile(project, args.name)), Path(args.output) if args.output else None)
    log.info("‣ Release file: %s (%d MiB). On a node: cbios update FILE", project.display(path),
             path.stat().st_size >> 20)
    return 0


def _bundle(args: argparse.Namespace, project: Project) -> Path:
    from cbios.pxe.bundle import PXE_DIR

    if args.bundle:
        return Path(args.bundle)
    if args.profile:
        from cbios.artifacts import built

        return built(project, _profile(project, args.profile)) / PXE_DIR
    raise CbiosError(f"pxe {args.pxe_command}: name the firmware: --profile NAME (a build) or --bundle DIR")


def cmd_pxe_publish(args: argparse.Namespace, project: Project) -> int:
    from cbios.pxe.serve import publish

    return publish(_bundle(args, project), address=args.address, port=args.port)


def cmd_pxe_serve(args: argparse.Namespace, project: Project) -> int:
    from cbios.pxe.serve import serve

    bundle = _bundle(args, project)
    receipts = Path(args.receipts) if args.receipts else bundle.resolve().parent / "receipts"
    return serve(bundle, args.interface, http_port=args.http_port, receipts=receipts, mode=args.mode)


def cmd_pxe_pack(args: argparse.Namespace, project: Project) -> int:
    from cbios.node import ed25519
    from cbios.pxe.kitfile import Kit
    from cbios.pxe.pack import pack

    if not args.profile and not args.bundle:
        raise CbiosError("pxe pack: name the firmware: PROFILE (a build) or --bundle DIR")
    bundle = _bundle(args, project)
    if args.key:
        try:
            key = Path(args.key).read_bytes()
        except OSError as e:
            raise CbiosError(f"--key {args.key}: {e.strerror}") from None
    elif args.profile:
        from cbios import signing

        key = signing.public_key(signing.key_of(project, _profile(project, args.profile)))
    else:
        raise CbiosError("pxe pack --bundle: name the public key that verifies its manifest: --key PEMFILE")
    path = pack(bundle, key, Path(args.output) if args.output else None, key_source=args.key or "the signing key")
    log.info("‣ Field kit: %s (%d MiB), key %s. On a laptop: python3 %s check; sudo python3 %s serve --interface IF",
             project.display(path), path.stat().st_size >> 20, ed25519.fingerprint(Kit(path).key()), path.name,
             path.name)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cbios", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show commands as they run, and tracebacks")
    p.add_argument("--version", action="version", version=f"cbios {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prof = sub.add_parser("profile", help="list, show and describe profiles")
    psub = prof.add_subparsers(dest="profile_command", required=True, metavar="SUBCOMMAND")
    psub.add_parser("list", help="names of the profiles").set_defaults(func=cmd_profile_list)
    show = psub.add_parser("show", help="print the resolved profile (extends applied, defaults filled)")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    show.set_defaults(func=cmd_profile_show)
    psub.add_parser("schema", help="JSON Schema of a profile file, for editors").set_defaults(
        func=cmd_profile_schema)

    b = sub.add_parser("build", help="build the firmware of a profile into build/NAME/")
    b.add_argument("name", metavar="PROFILE")
    b.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    b.set_defaults(func=cmd_build)

    boot = sub.add_parser("boot", help="boot a built profile in QEMU (serial console on this terminal)")
    boot.add_argument("name", metavar="PROFILE")
    boot.add_argument("--check", action="store_true",
                      help="wait for ready, power off, exit 0; non-zero with the console's tail on failure")
    boot.add_argument("--timeout", type=int, default=None, help="seconds to wait for ready (profile's default)")
    boot.add_argument("--disk", action="store_true", help="boot build/NAME/disk.qcow2 (BIOS, GRUB, LVM)")
    boot.add_argument("--persist", action="store_true",
                      help="with --disk: keep the guest's writes (default: a throw-away snapshot)")
    boot.set_defaults(func=cmd_boot)

    d = sub.add_parser("disk", help="make build/NAME/disk.qcow2 by running the flasher in QEMU")
    d.add_argument("name", metavar="PROFILE")
    d.add_argument("--force", action="store_true", help="remake it even when it is up to date")
    d.set_defaults(func=cmd_disk)

    r = sub.add_parser("release", help="one file with a build's update, for `cbios update FILE` on a node")
    r.add_argument("name", metavar="PROFILE")
    r.add_argument("--output", "-o", metavar="FILE", help="where (default: build/NAME/NAME-VERSION.cbios.tar)")
    r.set_defaults(func=cmd_release)

    pxe = sub.add_parser("pxe", help="network boots: serve a build to nodes over PXE")
    pxsub = pxe.add_subparsers(dest="pxe_command", required=True, metavar="SUBCOMMAND")
    ps = pxsub.add_parser("serve", help="proxy-DHCP, TFTP (iPXE) and HTTP for the nodes on one interface",
                          description="Serve a build's PXE bundle (build/NAME/pxe) on the nodes' network until "
                                      "Ctrl-C. The site's DHCP server keeps giving addresses.")
    ps.add_argument("--profile", metavar="NAME", help="serve build/NAME/pxe")
    ps.add_argument("--bundle", metavar="DIR", help="serve this bundle folder instead (a copy of build/NAME/pxe)")
    ps.add_argument("--interface", required=True, metavar="IF", help="the interface on the nodes' network")
    ps.add_argument("--http-port", type=int, default=8080, metavar="PORT", help="HTTP port (default 8080)")
    ps.add_argument("--mode", choices=list(contract.BOOT_MODES),
                    help="what every node does, with no menu (default: iPXE's menu, which boots after 10 s)")
    ps.add_argument("--receipts", metavar="DIR", help="where the flasher's receipts go (default: beside the bundle)")
    ps.set_defaults(func=cmd_pxe_serve)
    pp = pxsub.add_parser("publish", help="HTTP only: a release for `cbios update URL` on running nodes",
                          description="Serve a build's bundle (build/NAME/pxe) over HTTP until Ctrl-C, for "
                                      "`cbios update http://HOST:PORT/` on running nodes.")
    pp.add_argument("--profile", metavar="NAME", help="serve build/NAME/pxe")
    pp.add_argument("--bundle", metavar="DIR", help="serve this bundle folder instead")
    pp.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    pp.add_argument("--port", type=int, default=8086, help="HTTP port (default 8086)")
    pp.set_defaults(func=cmd_pxe_publish)
    pk = pxsub.add_parser("pack", help="one file that serves a build over PXE from a laptop (python3, dnsmasq, ipxe)",
                          description="Write the field kit: a Python zipapp with a build's bundle, the public key "
                                      "that verifies it and the PXE server; on a laptop: python3 KIT check, "
                                      "python3 KIT serve --interface IF.")
    pk.add_argument("profile", nargs="?", metavar="PROFILE", help="pack build/PROFILE/pxe")
    pk.add_argument("--bundle", metavar="DIR", help="pack this bundle folder instead (needs --key)")
    pk.add_argument("--key", metavar="PEMFILE",
                    help="the public key that verifies the manifest (default: the profile's signing key's)")
    pk.add_argument("--output", "-o", metavar="FILE",
                    help="where (default: PROFILE-VERSION.cbios-kit.pyz beside the bundle: build/PROFILE/)")
    pk.set_defaults(func=cmd_pxe_pack)
    return p


def reporting(call: Callable[[], int], *, debug: bool = False) -> int:
    """CALL's exit status; a CbiosError printed as its lines, with no traceback (raised with
    DEBUG), and its status."""
    try:
        return call()
    except ProfileError as e:
        if debug:
            raise
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return e.status
    except CbiosError as e:
        if debug:
            raise
        print(f"cbios: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"cbios: hint: {e.hint}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("cbios: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    return reporting(lambda: int(args.func(args, Project.find())), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
