#!/usr/bin/env python3
"""A stand-in for qemu-system-x86_64 in unit tests of the code that drives QEMU.

It reads the options the harness passes, then acts out what $FAKE_QEMU says:
  ready   - write console lines, report READY, serve a real bash on the shell socket
  crash   - write console lines and exit 1
  hang    - do nothing until killed
  flash   - write the console lines in $FAKE_QEMU_CONSOLE, report FLASHED and exit at once
Its argv is recorded in $FAKE_QEMU_ARGV."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def option(name: str) -> str:
    argv = sys.argv
    return next(argv[i + 1] for i in range(len(argv) - 1) if argv[i] == name)


def chardev(id_: str) -> str:
    for i, a in enumerate(sys.argv):
        if a == "-chardev" and f"id={id_}," in sys.argv[i + 1]:
            return next(p.split("=", 1)[1] for p in sys.argv[i + 1].split(",") if p.startswith("path="))
    raise SystemExit(f"no chardev {id_}")


def main() -> int:
    with open(os.environ["FAKE_QEMU_ARGV"], "w") as f:
        f.write("\0".join(sys.argv))
    mode = os.environ.get("FAKE_QEMU", "ready")
    if mode == "hang":
        time.sleep(3600)
    console = option("-serial").removeprefix("file:")
    if mode == "flash":
        return flash(console)
    with open(console, "w") as f:
        f.writelines(f"[    {n}.000000] console line {n}\n" for n in range(40))
    if mode == "crash":
        return 1
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(chardev("shell"))
    server.listen(1)
    with open(chardev("ready"), "w") as f:
        f.write("READY profile=fake version=1\n")
    conn, _ = server.accept()
    subprocess.run(["bash", "--noprofile", "--norc"], stdin=conn, stdout=conn, stderr=conn, check=False)
    return 0


def flash(console: str) -> int:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(chardev("shell"))
    server.listen(1)
    server.accept()  # the harness connects before it waits for the verdict
    with open(console, "w") as f:
        f.write(open(os.environ["FAKE_QEMU_CONSOLE"]).read())
    with open(chardev("ready"), "w") as f:
        f.write("FLASHED install fake 1.0 on /dev/vda\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
