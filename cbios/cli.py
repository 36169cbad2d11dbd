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
from cbios.errors import EXIT_CODES, CbiosError, ProfileError
from cbios.node import contract, pipes
from cbios.project import Project

if TYPE_CHECKING:
    from cbios.profile import Profile

log = logging.getLogger("cbios")


def _profile(project: Project, name: str) -> Profile:
    from cbios.profile import load_profile

    return load_profile(project, name)


def _profile_name(args: argparse.Namespace) -> str:
    """PROFILE, given as `cbios VERB NAME` or as `--profile NAME` (invoke's spelling)."""
    verb = args.command if args.command != "profile" else f"profile {args.profile_command}"
    if args.name and args.profile and args.name != args.profile:
        raise CbiosError(f"{verb}: two profiles named: {args.name} and --profile {args.profile}")
    name: str | None = args.name or args.profile
    if not name:
        raise CbiosError(f"{verb}: name the profile: cbios {verb} NAME, or --profile NAME ('cbios profile list')")
    return name


def cmd_profile_list(args: argparse.Namespace, project: Project) -> int:
    """Every profile, with what it says of itself; one that does not load is listed with its
    first problem (and makes the status 2), never left out."""
    from cbios.profile import available, load_profile

    rows: list[dict[str, object]] = []
    for name in available(project):
        try:
            profile = load_profile(project, name)
        except CbiosError as e:
            rows.append({"name": name, "error": str(e).splitlines()[0]})
            continue
        rows.append({"name": name, "version": profile.version, "extends": profile.extends,
                     "test": profile.test, "description": profile.description})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max((len(str(r["name"])) for r in rows), default=0)
        for r in rows:
            what = f"ERROR {r['error']}" if "error" in r else \
                f"{r['version']:<8} {r['description']}" + ("  [test firmware]" if r["test"] else "")
            print(f"{r['name']:<{width}}  {what}")
    return 2 if any("error" in r for r in rows) else 0


def cmd_profile_show(args: argparse.Namespace, project: Project) -> int:
    profile = _profile(project, _profile_name(args))
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

    build(project, _profile(project, _profile_name(args)), force=args.force)
    return 0


def cmd_boot(args: argparse.Namespace, project: Project) -> int:
    from cbios.boot import boot

    return boot(project, _profile(project, _profile_name(args)), check=args.check, timeout=args.timeout,
                disk=args.disk, persist=args.persist)


def cmd_disk(args: argparse.Namespace, project: Project) -> int:
    from cbios.disk import make_disk

    make_disk(project, _profile(project, _profile_name(args)), force=args.force)
    return 0


def cmd_release(args: argparse.Namespace, project: Project) -> int:
    from cbios.artifacts import built
    from cbios.release import write_release

    out = built(project, _profile(project, _profile_name(args)))
    path = write_release(out, Path(args.output) if args.output else None)
    log.info("‣ Release file: %s (%d MiB). On a node: cbios update FILE", project.display(path),
             path.stat().st_size >> 20)
    return 0


COMPLETION_SHELLS = ["bash", "zsh", "tcsh"]


def cmd_completion(args: argparse.Namespace, project: Project) -> int:
    import shtab

    print(shtab.complete(parser(), shell=args.shell, preamble=COMPLETION_PREAMBLE.get(args.shell, "")), end="")
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
    from cbios.pxe import service
    from cbios.pxe.serve import serve

    bundle = _bundle(args, project)
    receipts = Path(args.receipts) if args.receipts else bundle.resolve().parent / service.RECEIPTS
    return serve(bundle, args.interface, http_port=args.http_port, receipts=receipts, mode=args.mode)


def cmd_doctor(args: argparse.Namespace, project: Project) -> int:
    from cbios.doctor import report

    return report(project, args.verb, as_json=args.json)


PROFILE_HELP = "a profile's name: profiles/NAME.yaml ('cbios profile list')"


def _epilog(*examples: str) -> str:
    """--help's tail: examples, then the exit codes (cbios.errors.EXIT_CODES)."""
    lines = ["examples:", *(f"  {e}" for e in examples), "", "exit status:"]
    lines += [f"  {code:<3}  {meaning}" for code, meaning in EXIT_CODES.items()]
    return "\n".join(lines)


def _verb(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, *examples: str,
          description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                          epilog=_epilog(*examples), formatter_class=argparse.RawDescriptionHelpFormatter)


def cmd_pxe_pack(args: argparse.Namespace, project: Project) -> int:
    from cbios import manifest
    from cbios.node import ed25519
    from cbios.pxe.kitfile import Kit
    from cbios.pxe.pack import pack

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
    # The kit's own check runs the kit's code: it finds damage, not a forgery. A sha256 the
    # staff get by another way than the kit does.
    log.info("  publish with it: sha256 %s (sha256sum %s)", manifest.sha256_file(path), path.name)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cbios", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog("cbios profile list", "cbios build qemu-test", "cbios boot qemu-test --check",
                       "cbios pxe serve --profile compute --interface eth1",
                       "cbios COMMAND --help     (each command's options and examples)"))
    p.add_argument("--debug", action="store_true", help="show commands as they run, and tracebacks")
    p.add_argument("--version", action="version", version=f"cbios {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prof = _verb(sub, "profile", "list, show and describe profiles",
                 "cbios profile list --json", "cbios profile show compute",
                 "cbios profile schema > profile.schema.json")
    psub = prof.add_subparsers(dest="profile_command", required=True, metavar="SUBCOMMAND")
    pl = _verb(psub, "list", "the profiles: name, version, description", "cbios profile list",
               "cbios profile list --json | jq -r '.[].name'")
    pl.add_argument("--json", action="store_true", help="a JSON list of objects")
    pl.set_defaults(func=cmd_profile_list)
    show = _verb(psub, "show", "print the resolved profile (extends applied, defaults filled)",
                 "cbios profile show qemu-test", "cbios profile show compute --json")
    _profile_arguments(show)
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    show.set_defaults(func=cmd_profile_show)
    _verb(psub, "schema", "JSON Schema of a profile file, for editors",
          "cbios profile schema > profile.schema.json").set_defaults(func=cmd_profile_schema)

    b = _verb(sub, "build", "build the firmware of a profile into build/NAME/",
              "cbios build qemu-test", "cbios build compute --force")
    _profile_arguments(b)
    b.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    b.set_defaults(func=cmd_build)

    boot = _verb(sub, "boot", "boot a built profile in QEMU (serial console on this terminal)",
                 "cbios boot qemu-test", "cbios boot qemu-test --check --timeout 300",
                 "cbios boot qemu-test --disk --persist")
    _profile_arguments(boot)
    boot.add_argument("--check", action="store_true",
                      help="wait for ready, power off, exit 0; non-zero with the console's tail on failure")
    boot.add_argument("--timeout", type=int, default=None, help="seconds to wait for ready (profile's default)")
    boot.add_argument("--disk", action="store_true", help="boot build/NAME/disk.qcow2 (BIOS, GRUB, LVM)")
    boot.add_argument("--persist", action="store_true",
                      help="with --disk: keep the guest's writes (default: a throw-away snapshot)")
    boot.set_defaults(func=cmd_boot)

    d = _verb(sub, "disk", "make build/NAME/disk.qcow2 by running the flasher in QEMU",
              "cbios disk qemu-test", "cbios disk qemu-test --force")
    _profile_arguments(d)
    d.add_argument("--force", action="store_true", help="remake it even when it is up to date")
    d.set_defaults(func=cmd_disk)

    r = _verb(sub, "release", "one file with a build's update, for `cbios update FILE` on a node",
              "cbios release compute", "cbios release compute -o /srv/releases/compute.cbios.tar")
    _profile_arguments(r)
    r.add_argument("--output", "-o", metavar="FILE", help="where (default: build/NAME/NAME-VERSION.cbios.tar)")
    r.set_defaults(func=cmd_release)

    pxe = _verb(sub, "pxe", "network boots: serve a build to nodes over PXE",
                "cbios pxe serve --profile compute --interface eth1 --mode install",
                "cbios pxe publish --profile compute --address 0.0.0.0")
    pxsub = pxe.add_subparsers(dest="pxe_command", required=True, metavar="SUBCOMMAND")
    ps = _verb(pxsub, "serve", "proxy-DHCP, TFTP (iPXE) and HTTP for the nodes on one interface",
               "cbios pxe serve --profile compute --interface eth1",
               "cbios pxe serve --bundle /media/usb/pxe --interface eth1 --mode install",
               description="Serve a build's PXE bundle (build/NAME/pxe) on the nodes' network until Ctrl-C. "
                           "The site's DHCP server keeps giving addresses.")
    _firmware_options(ps)
    ps.add_argument("--interface", required=True, metavar="IF", help="the interface on the nodes' network")
    ps.add_argument("--http-port", type=int, default=8080, metavar="PORT", help="HTTP port (default 8080)")
    ps.add_argument("--mode", choices=list(contract.BOOT_MODES),
                    help="what every node does, with no menu (default: iPXE's menu, which boots after 10 s)")
    ps.add_argument("--receipts", metavar="DIR", help="where the flasher's receipts go (default: beside the bundle)")
    ps.set_defaults(func=cmd_pxe_serve)
    pp = _verb(pxsub, "publish", "HTTP only: a release for `cbios update URL` on running nodes",
               "cbios pxe publish --profile compute --address 0.0.0.0 --port 8086",
               description="Serve a build's bundle (build/NAME/pxe) over HTTP until Ctrl-C, for "
                           "`cbios update http://HOST:PORT/` on running nodes.")
    _firmware_options(pp)
    pp.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    pp.add_argument("--port", type=int, default=8086, help="HTTP port (default 8086)")
    pp.set_defaults(func=cmd_pxe_publish)
    pk = _verb(pxsub, "pack", "one file that serves a build over PXE from a laptop (python3, dnsmasq, ipxe)",
               "cbios pxe pack --profile compute", "cbios pxe pack --bundle /srv/pxe --key release.pub -o kit.pyz",
               description="Write the field kit: a Python zipapp with a build's bundle, the public key that "
                           "verifies it and the PXE server; on a laptop: python3 KIT check, "
                           "python3 KIT serve --interface IF.")
    _firmware_options(pk, "pack")
    pk.add_argument("--key", metavar="PEMFILE",
                    help="the public key that verifies the manifest (default: the profile's signing key's)")
    pk.add_argument("--output", "-o", metavar="FILE",
                    help="where (default: PROFILE-VERSION.cbios-kit.pyz beside the bundle: build/PROFILE/)")
    pk.set_defaults(func=cmd_pxe_pack)

    comp = _verb(sub, "completion", "a shell completion script for cbios, on stdout",
                 "cbios completion bash > /etc/bash_completion.d/cbios",
                 "cbios completion zsh > ~/.zfunc/_cbios")
    comp.add_argument("shell", choices=COMPLETION_SHELLS)
    comp.set_defaults(func=cmd_completion)

    from cbios.doctor import VERBS

    doc = _verb(sub, "doctor", "check this host has what a verb needs (exit 1 if it has not)",
                "cbios doctor", "cbios doctor pxe-serve", "cbios doctor --json | jq '.[] | select(.status != \"ok\")'")
    doc.add_argument("verb", nargs="?", choices=VERBS, metavar="VERB", help=f"one of {', '.join(VERBS)} (default: all)")
    doc.add_argument("--json", action="store_true", help="a JSON list of checks: name, status, detail, fix, verbs")
    doc.set_defaults(func=cmd_doctor)
    return p


# Shell completion of profile names: the files in profiles/ of $CBIOS_PROJECT or the
# current folder (a checkout), without running Python at each <Tab>.
_PROFILES = 'command ls "${CBIOS_PROJECT:-.}/profiles" 2>/dev/null | sed -n "s/\\.yaml$//p"'
PROFILE_COMPLETION = {"bash": "_cbios_profiles", "zsh": "_cbios_profiles"}
COMPLETION_PREAMBLE = {
    "bash": f'_cbios_profiles() {{ compgen -W "$({_PROFILES})" -- "$1"; }}',
    "zsh": f'_cbios_profiles() {{ compadd -- ${{(f)"$({_PROFILES})"}}; }}',
}


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="PROFILE", nargs="?", help=PROFILE_HELP).complete = PROFILE_COMPLETION  # type: ignore[attr-defined]
    p.add_argument("--profile", metavar="NAME",
                   help="the same, as an option (as invoke's tasks take it)").complete = PROFILE_COMPLETION  # type: ignore[attr-defined]


def _firmware_options(p: argparse.ArgumentParser, verb: str = "serve") -> None:
    """Which firmware a serving verb serves: no default, so that no test firmware is served by
    a forgotten option."""
    p.add_argument("--profile", metavar="NAME",
                   help=f"{verb} build/NAME/pxe, a build of profiles/NAME.yaml").complete = PROFILE_COMPLETION  # type: ignore[attr-defined]
    p.add_argument("--bundle", metavar="DIR", help=f"{verb} this bundle folder instead (a copy of build/NAME/pxe)")


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
    args = pipes.parsed(lambda: parser().parse_args(argv))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    return reporting(lambda: pipes.quietly(lambda: int(args.func(args, Project.find()))), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
