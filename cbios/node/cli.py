"""`cbios` on a node: status of the firmware copies, and the commit of a healthy boot."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cbios.node import contract, pipes, wire
from cbios.node.boot import bootenv, scrub, status

# update (HTTP, TLS, tar) and bootstrap (CB-Manager's client) are imported by the commands
# that use them: the health gate's `commit` and cbios-slots' `slots-up` run at every boot,
# and a cold import of those modules cost seconds of it under TCG.

UPDATE_TIMEOUT = 1800 + 60  # through CB-Manager, which gives CB-Executor 1800 s for it


def cmd_status(args: argparse.Namespace) -> int:
    own = status.release(status.RELEASE.read_text())
    running = bootenv.running_copy()
    env = receipt = None
    if running is not None:
        with bootenv.boot_partition() as path:
            env = bootenv.read(path)
            receipt = bootenv.flash_receipt(path)
    st = status.gather(env, running, own, bootenv.boot_source(), receipt)
    print(json.dumps(st, indent=2) if args.json else status.render_text(st), end="\n" if args.json else "")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    """Mark the running copy good and the one to boot next. Called once the node is ready."""
    running = bootenv.running_copy()
    if running is None:
        print("cbios: not booted from a node disk: nothing to commit", file=sys.stderr)
        return 0
    own = status.release(status.RELEASE.read_text())
    with bootenv.boot_partition(writable=True) as path:
        try:
            env = bootenv.read(path)
        except bootenv.BootEnvError as e:
            verity = bootenv.cmdline_value("cbios.verity")
            if verity is None:
                raise
            print(f"cbios: {path}: {e}: rebuilt from this boot (copy {running})", file=sys.stderr)
            env = bootenv.rebuilt(running, verity)
            bootenv.write(path, env)
        if env.get(f"cbios_{running}_state") == "bad":
            print(f"cbios: copy {running} is marked bad ({env.get('cbios_corrupt') or 'by the boot loader'}): "
                  "not committed", file=sys.stderr)
            return 1
        new = bootenv.committed(env, running, own.get("CBIOS_VERSION"))
        if new != env:
            bootenv.write(path, new)
    print(f"cbios: committed copy {running}")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    """New firmware into the copy that is not running; reboot into it unless --no-reboot."""
    from cbios.node import update

    if args.through_manager:
        if args.force:
            print("cbios: update: --force is for the node's own console, not --through-manager", file=sys.stderr)
            return 2
        result = wire.call(contract.MANAGER_SOCKET, "update", {
            "source": args.source, "allow_downgrade": args.allow_downgrade, "reboot": not args.no_reboot},
            timeout=UPDATE_TIMEOUT)
    else:
        try:
            result = update.update(update.node_here(), args.source, allow_downgrade=args.allow_downgrade,
                                   force=args.force, say=lambda line: print(f"cbios: {line}", flush=True))
        except update.UpdateError as e:
            print(f"cbios: update: {e}", file=sys.stderr)
            return 2
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


def _copy_device(copy: str) -> Path:
    vg = status.release(status.RELEASE.read_text()).get("CBIOS_VG", "lvm")
    return Path(f"/dev/{vg}/{bootenv.COPIES[copy]}")


def cmd_scrub(args: argparse.Namespace) -> int:
    """Read both copies whole through dm-verity (at boot, the running one); mark a corrupt one
    bad. Exit 1 if one was."""
    running = bootenv.running_copy()
    if running is None:
        print("cbios: not booted from a node disk: no copies to scrub", file=sys.stderr)
        return 0
    with bootenv.boot_partition() as path:
        env = bootenv.read(path)
    # At boot, the running copy: the other was read back when it was written, and the
    # scheduled scrub reads both.
    findings = scrub.scrub_copies(env, _copy_device, copies=(running,) if args.boot else bootenv.COPIES)
    for f in findings:
        if f.result == "corrupt":
            scrub.report(f"CORRUPT copy {f.copy}{' (running)' if f.copy == running else ''}: {f.detail}")
        else:
            print(f"cbios: scrub: copy {f.copy}: {f.result}: {f.detail}", flush=True)
    if args.json:
        print(json.dumps([f.__dict__ for f in findings], indent=2))
    if not any(f.result == "corrupt" for f in findings):
        return 0
    with bootenv.boot_partition(writable=True) as path:
        env = scrub.mark(bootenv.read(path), findings)
        bootenv.write(path, env)
    if args.boot and scrub.should_reboot(env, running):
        scrub.report(f"copy {running} is corrupt: rebooting into copy {bootenv.other(running)}")
        # --force: no unit is stopped one by one (that runs programs of the corrupt copy);
        # processes are killed and file systems unmounted.
        subprocess.run(["systemctl", "reboot", "--force"], check=False, stdin=subprocess.DEVNULL)
    return 1


def cmd_corrupt(args: argparse.Namespace) -> int:
    """The kernel refused a block of the running copy (udev, on dm-verity's event): mark it bad."""
    running = bootenv.running_copy()
    if running is None:
        return 0
    kind, _, block = args.block.partition(",")
    what = {"0": "data", "1": "hash"}.get(kind, "a")
    with bootenv.boot_partition(writable=True) as path:
        env = bootenv.read(path)
        if env.get(f"cbios_{running}_state") == "bad":
            return 0
        bootenv.write(path, bootenv.corrupted(env, running, f"corrupt: {what} block {block} refused by dm-verity"))
    scrub.report(f"CORRUPT copy {running} (running): dm-verity refused {what} block {block}; "
                 f"copy {bootenv.other(running)} boots next")
    return 1


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
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    for key, value in env.items():
        print(f"{key}={value}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    """The cluster: its key on this node (set it, show its fingerprint, rotate it on every
    member), and its members (join, leave, list them)."""
    from cbios.node.cluster import keyring

    if args.action in ("join", "leave", "members"):
        return _cluster_members(args)
    ring = keyring.Keyring()
    if args.action == "set-key":
        if args.file is None:
            print("cbios: cluster set-key FILE (- for stdin)", file=sys.stderr)
            return 2
        data = sys.stdin.buffer.read(keyring.MAX_BYTES + 1) if args.file == "-" else Path(args.file).read_bytes()
        try:
            fingerprint = ring.install(data)
        except keyring.BadKey as e:
            print(f"cbios: cluster set-key: {e}", file=sys.stderr)
            return 2
        print(f"cbios: cluster key {fingerprint} set in {ring.path}: "
              "every management node of the cluster needs the same")
        return 0
    if args.action == "key":
        current, keys = ring.current(), ring.keys()
        if current is None:
            print(f"no cluster key ({ring.path}): this node's slots run, the other nodes are not asked; "
                  "set one with `cbios cluster set-key FILE`")
            return 1
        print(f"current:  {keyring.fingerprint(current)}")
        for previous in keys[1:]:
            print(f"previous: {keyring.fingerprint(previous)}")
        return 0
    rows = wire.call(contract.MANAGER_SOCKET, "rotate_key", {}, timeout=120)
    for row in rows:
        print(f"{row['node']}  {row['status']}  {row.get('fingerprint') or row.get('error')}")
    return 0 if all(r["status"] == "ROTATED" for r in rows) else 1


def _cluster_members(args: argparse.Namespace) -> int:
    """join ADDRESS, leave, members: through CB-Manager, which keeps the list."""
    if args.action == "join" and args.file is None:
        print("cbios: cluster join ADDRESS (any member's CB-Manager address)", file=sys.stderr)
        return 2
    call = {"join": ("cluster_join", {"address": args.file}), "leave": ("cluster_leave", {}),
            "members": ("cluster_members", {})}[args.action]
    try:
        rows = wire.call(contract.MANAGER_SOCKET, *call, timeout=120)
    except wire.RemoteError as e:
        print(f"cbios: cluster {args.action}: {e}", file=sys.stderr)
        return 2 if e.code == "invalid" else 1
    except OSError as e:
        print(f"cbios: cluster {args.action}: CB-Manager does not answer ({e.strerror or e})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['node']}  {row['address']:<15}  {row['status']}" + (f"  {row['error']}" if row.get("error")
                                                                             else ""))
    fine = {"THIS NODE", "REACHABLE", "JOINED", "TOLD"}
    return 0 if all(r["status"] in fine for r in rows) else 1


def cmd_slots_up(args: argparse.Namespace) -> int:
    from cbios.node.boot import bootstrap

    return bootstrap.up()


def cmd_slots_down(args: argparse.Namespace) -> int:
    from cbios.node.boot import bootstrap

    return bootstrap.down()


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
    u.add_argument("--force", action="store_true",
                   help="also a version that failed the health gate on this node before (not --through-manager)")
    u.add_argument("--no-reboot", action="store_true", help="do not reboot: the new copy boots next time")
    u.add_argument("--through-manager", action="store_true",
                   help="ask CB-Manager, as a remote caller would (SOURCE as the node sees it)")
    u.add_argument("--json", action="store_true", help="the result as JSON")
    u.set_defaults(func=cmd_update)
    f = sub.add_parser("record-failure", help="keep why this boot was not ready (done by the health gate)")
    f.add_argument("reason")
    f.set_defaults(func=cmd_record_failure)
    c = sub.add_parser("scrub", help="read both copies whole through dm-verity; mark a corrupt one bad")
    c.add_argument("--boot", action="store_true",
                   help="at boot: the running copy alone; if it is corrupt and the other is not, reboot into it")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_scrub)
    k = sub.add_parser("corrupt", help="the running copy's block BLOCK was refused by dm-verity (done by udev)")
    k.add_argument("block", metavar="BLOCK", help="dm-verity's DM_VERITY_ERR_BLOCK_NR: TYPE,BLOCK")
    k.set_defaults(func=cmd_corrupt)
    b = sub.add_parser("bootenv", help="show, or set with KEY=VALUE (empty VALUE unsets), the boot state")
    b.add_argument("set", nargs="*", metavar="KEY=VALUE")
    b.add_argument("--json", action="store_true", help="the boot state as one JSON object")
    b.set_defaults(func=cmd_bootenv)
    k = sub.add_parser("cluster", help="the cluster: set-key FILE|-, key (its fingerprint), rotate-key; "
                                       "join ADDRESS, leave, members")
    k.add_argument("action", choices=["set-key", "key", "rotate-key", "join", "leave", "members"])
    k.add_argument("file", nargs="?", metavar="FILE|ADDRESS",
                   help="set-key: a file of 32 to 4096 bytes, - for stdin; join: any member's CB-Manager address")
    k.add_argument("--json", action="store_true", help="join, leave, members: the rows as JSON")
    k.set_defaults(func=cmd_cluster)
    sub.add_parser("slots-up", help="start CB-Manager (cbios-slots.service)").set_defaults(func=cmd_slots_up)
    sub.add_parser("slots-down", help="stop every slot, CB-Manager last (cbios-slots.service)").set_defaults(
        func=cmd_slots_down)
    args = pipes.parsed(lambda: p.parse_args(argv))
    try:
        status_code: int = pipes.quietly(lambda: args.func(args))
        return status_code
    except wire.RemoteError as e:
        print(f"cbios: {e}", file=sys.stderr)
        return 2 if e.code == "invalid" else 1
    except (bootenv.BootEnvError, OSError) as e:
        print(f"cbios: {e}", file=sys.stderr)
        return 2
