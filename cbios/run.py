"""Every subprocess goes through here: argv lists, stdin from /dev/null, a clean locale,
the command logged in debug mode, the whole command line reported when it fails."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from cbios.errors import StepError

log = logging.getLogger("cbios")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    env["LANG"] = "C.UTF-8"
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    step: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    capture: bool = False,
    log_file: Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv; on failure raise StepError naming the step, the command and its last output.
    ON_LINE (with LOG_FILE): each line of its output, as it comes, besides the log."""
    cmd = [os.fspath(a) for a in argv]
    log.debug("+ %s", shlex.join(cmd))
    out_fh = open(log_file, "ab") if log_file else None
    try:
        if out_fh is not None:
            out_fh.write(f"+ {shlex.join(cmd)}\n".encode())
            out_fh.flush()
        try:
            if on_line is not None:
                assert out_fh is not None, "on_line needs a log_file"
                proc = run_following(cmd, out_fh, on_line, env=env, cwd=cwd)
            else:
                proc = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE if capture else out_fh,
                    stderr=subprocess.STDOUT if (out_fh is not None and not capture) else (
                        subprocess.PIPE if capture else None),
                    text=True,
                    env=clean_env(env),
                    cwd=cwd,
                    check=False,
                )
        except FileNotFoundError as e:
            raise StepError(step, f"{cmd[0]} is not installed", hint="run 'make deps'") from e
    finally:
        if out_fh is not None:
            out_fh.close()
    if proc.returncode != 0:
        detail = ""
        if log_file is not None:
            detail = "\n" + tail(log_file, 15) + f"\n(full log: {log_file})"
        elif capture and proc.stderr:
            detail = "\n" + proc.stderr.strip()[-2000:]
        raise StepError(step, f"'{shlex.join(cmd)}' failed with exit status {proc.returncode}{detail}")
    return proc


def run_following(cmd: list[str], out: BinaryIO, on_line: Callable[[str], None], *,
                  env: Mapping[str, str] | None, cwd: Path | None) -> subprocess.CompletedProcess[str]:
    """CMD with its output copied to OUT as it is (bytes), each line also given to ON_LINE."""
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=clean_env(env), cwd=cwd) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            out.write(raw)
            out.flush()  # the log is read while it runs
            on_line(raw.decode(errors="replace").rstrip("\r\n"))
    return subprocess.CompletedProcess(cmd, proc.returncode)


def tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@contextmanager
def complete_step(message: str) -> Iterator[None]:
    """Say that a long step starts and how long it took."""
    log.info("‣ %s", message)
    start = time.monotonic()
    yield
    log.info("  done in %.1f s", time.monotonic() - start)
