"""`cbios` on a node: status of the firmware copies, and the commit of a healthy boot."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Sequence

from cbios.node import bootenv, bootstrap, slotdefs, status, update, wire

UPDATE_TIMEOUT = 1800 + 60  # through CB-Manager, which gives CB-Executor 1800 s for it


def cmd_status(args: argparse.Namespace) -> int:
    own = status.release(status.RELEASE.read_text())
    running = bootenv.running_copy()
    env = None
    if running is not None:
        with bootenv.boot_partition() as path:
            env = bootenv.read(path)
    st = status.gather(env, running, own, bootenv.boot_source())
    print(json.dumps(st, indent=2) if args.json else status.render_text(st), end="\n" if args.json else "")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    """Mark the running copy good and the one to boot next. Called once the node is ready."""
    running = bootenv.running_copy()
    if running is None:
        print("cbios: not booted from a node disk: nothing to commit", file=sys.stderr)
        return 0
    with bootenv.boot_partition(writable=True) as path:
        env = bootenv.read(path)
        new = bootenv.committed(env, running)
        if new != env:
            bootenv.write(path, new)
    print(f"cbios: committed copy {running}")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    """New firmware into the copy that is not running; reboot into it unless --no-reboot."""
    if args.through_manager:
        result = wire.call(slotdefs.MANAGER_SOCKET, "update", {
            "source": args.source, "allow_downgrade": args.allow_downgrade, "reboot": not args.no_reboot},
            timeout=UPDATE_TIMEOUT)
    else:
        result = update.update(update.node_here(), args.source, allow_downgrade=args.allow_downgrade,
                               say=lambda line: print(f"cbios: {line}", flush=True))
    if args.json:
        print(json.dumps(result, indent=2))
    if not args.no_reboot and not args.through_manager:
        print(f"cbios: rebooting into copy {result['copy']}", flush=True)
        subprocess.run(["systemctl", "reboot"], check=False, stdin=subprocess.DEVNULL)
    return 0


def cmd_record_failure(args: argparse.Namespace) -> int:
    """Keep why this boot was not ready, for `cbios status` after a fallback (the health gate)."""
    running = bootenv.running_copy()
    if running is None:
        return 0
    own = status.release(status.RELEASE.read_text())
    with bootenv.boot_partition(writable=True) as path:
        env = bootenv.read(path)
        bootenv.write(path, bootenv.with_failure(env, running, own.get("CBIOS_VERSION", "?"), args.reason))
    return 0


def cmd_bootenv(args: argparse.Namespace) -> int:
    """Show or set raw boot state (cbios_* variables), for service staff."""
    with bootenv.boot_partition(writable=bool(args.set)) as path:
        env = bootenv.read(path)
        for assignment in args.set:
            key, _, value = assignment.partition("=")
            if not key.startswith("cbios_"):
                print(f"cbios: {key}: only cbios_* variables", file=sys.stderr)
                return 2
            if value:
                env[key] = value
            else:
                env.pop(key, None)
        if args.set:
            bootenv.write(path, env)
    for key, value in env.items():
        print(f"{key}={value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="cbios", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("status", help="the firmware copies: running, versions, tries, last fallback")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    sub.add_parser("commit", help="mark the running copy good (done by the health gate)").set_defaults(
        func=cmd_commit)
    u = sub.add_parser("update", help="write new firmware into the copy that is not running, and boot it")
    u.add_argument("source", metavar="SOURCE",
                   help="a build or PXE bundle directory (or its manifest.json), or an http(s) URL of one")
    u.add_argument("--allow-downgrade", action="store_true", help="also an older version, or the same")
    u.add_argument("--no-reboot", action="store_true", help="do not reboot: the new copy boots next time")
    u.add_argument("--through-manager", action="store_true",
                   help="ask CB-Manager, as a remote caller would (SOURCE as the node sees it)")
    u.add_argument("--json", action="store_true", help="the result as JSON")
    u.set_defaults(func=cmd_update)
    f = sub.add_parser("record-failure", help="keep why this boot was not ready (done by the health gate)")
    f.add_argument("reason")
    f.set_defaults(func=cmd_record_failure)
    b = sub.add_parser("bootenv", help="show, or set with KEY=VALUE (empty VALUE unsets), the boot state")
    b.add_argument("set", nargs="*", metavar="KEY=VALUE")
    b.set_defaults(func=cmd_bootenv)
    sub.add_parser("slots-up", help="start CB-Manager (cbios-slots.service)").set_defaults(
        func=lambda _: bootstrap.up())
    sub.add_parser("slots-down", help="stop every slot, CB-Manager last (cbios-slots.service)").set_defaults(
        func=lambda _: bootstrap.down())
    args = p.parse_args(argv)
    try:
        status_code: int = args.func(args)
        return status_code
    except update.UpdateError as e:
        print(f"cbios: update: {e}", file=sys.stderr)
        return 2
    except wire.RemoteError as e:
        print(f"cbios: {e}", file=sys.stderr)
        return 2 if e.code == "invalid" else 1
    except (bootenv.BootEnvError, OSError) as e:
        print(f"cbios: {e}", file=sys.stderr)
        return 2
