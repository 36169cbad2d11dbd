"""`cbios` on a node: status of the firmware copies, and the commit of a healthy boot."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from cbios.node import bootenv, bootstrap, status


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
    except (bootenv.BootEnvError, OSError) as e:
        print(f"cbios: {e}", file=sys.stderr)
        return 2
