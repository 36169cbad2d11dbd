"""The `cbios` command's manners: listings as JSON, --help with examples and exit codes, a
closed pipe, shell completion, and invoke's tasks taking the same options as the verbs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbios import docs
from cbios.cli import parser
from cbios.errors import EXIT_CODES
from cbios.node import pipes
from cbios.project import Project

REPO = Path(__file__).resolve().parents[2]
CBIOS = [sys.executable, "-m", "cbios.cli"]


def cbios(*argv: str, project: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CBIOS_PROJECT": str(project), "CBIOS_BUILD_DIR": str(project / "build")}
    return subprocess.run([*CBIOS, *argv], capture_output=True, text=True, env=env, cwd=project, check=False,
                          stdin=subprocess.DEVNULL)


def verbs(p: argparse.ArgumentParser) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command and subcommand of P, by its words."""
    return {words: sub for words, sub, _ in docs.commands(p)}


def test_profile_list_json_lists_every_profile(project: Project) -> None:
    proc = cbios("profile", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == sorted(p.stem for p in project.profiles.glob("*.yaml"))
    qemu_test = next(r for r in rows if r["name"] == "qemu-test")
    assert qemu_test["test"] is True and qemu_test["version"] and qemu_test["extends"] == "base"
    assert next(r for r in rows if r["name"] == "compute")["test"] is False


def test_a_profile_that_does_not_load_is_listed_with_its_problem(tmp_project: Project) -> None:
    (tmp_project.profiles / "broken.yaml").write_text("extends: nowhere\n")
    proc = cbios("profile", "list", "--json", project=tmp_project.root)
    assert proc.returncode == 2
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["base"]["version"] == "1.0"
    assert "nowhere" in rows["broken"]["error"]
    plain = cbios("profile", "list", project=tmp_project.root)
    assert plain.returncode == 2 and any(line.startswith("broken ") and "ERROR" in line
                                         for line in plain.stdout.splitlines())


@pytest.mark.parametrize("argv", [["profile", "schema"], ["profile", "list"], ["completion", "bash"], ["--help"],
                                  ["pxe", "serve", "--help"], ["--version"]])
def test_a_reader_gone_before_the_first_byte_is_no_error(argv: list[str]) -> None:
    """The pipe's read end is closed before cbios starts, so every write fails (no race)."""
    read, write = os.pipe()
    os.close(read)
    try:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout flushed at exit
        proc = subprocess.run([*CBIOS, *argv], stdout=write, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              check=False, stdin=subprocess.DEVNULL, env=env)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_a_broken_socket_is_not_taken_for_a_closed_stdout() -> None:
    """EPIPE from a peer (a daemon that closed its end) is an error to report, not the reader
    of stdout going away."""
    def send_to_a_closed_peer() -> int:
        import socket

        a, b = socket.socketpair()
        b.close()
        a.sendall(b"x" * 65536)
        return 0

    with pytest.raises(BrokenPipeError):
        pipes.quietly(send_to_a_closed_peer)


def test_every_verb_has_examples_and_the_exit_codes_in_its_help() -> None:
    for words, sub in [((), parser()), *verbs(parser()).items()]:
        text = sub.format_help()
        assert "examples:\n  cbios" in text, words
        for code, meaning in EXIT_CODES.items():
            assert f"{code:<3}  {meaning}" in text, words


def test_a_verb_takes_its_profile_as_a_word_or_as_an_option() -> None:
    assert cbios("profile", "show", "--profile", "base", "--json").returncode == 0
    proc = cbios("build")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "name the profile" in proc.stderr
    proc = cbios("profile", "show", "base", "--profile", "compute")
    assert proc.returncode == 2 and "two profiles" in proc.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_knows_every_verb(shell: str) -> None:
    proc = cbios("completion", shell)
    assert proc.returncode == 0, proc.stderr
    for words in verbs(parser()):
        if shell == "bash":  # each level's words, as an array: _shtab_cbios_pxe_subparsers=(serve publish pack)
            array = "_".join(["_shtab_cbios", *words[:-1], "subparsers="])
            line = next(line for line in proc.stdout.splitlines() if line.startswith(array))
            assert words[-1] in line.split("=", 1)[1].strip("()").split(), (words, line)
        else:  # each word with its description: "    pack:'Write the field kit..."
            assert f"\n    {words[-1]}:'" in proc.stdout, words
    if shell == "bash":
        check = subprocess.run(["bash", "-n"], input=proc.stdout, capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stderr


INVOKE = [str(Path(sys.executable).with_name("invoke"))]


@pytest.mark.parametrize("argv", [["pxe-serve", "--interface", "lo"], ["publish"], ["release"], ["pxe-pack"]])
def test_a_task_that_serves_or_flashes_nodes_has_no_default_firmware(argv: list[str]) -> None:
    proc = subprocess.run([*INVOKE, *argv], capture_output=True, text=True, cwd=REPO, check=False,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--profile NAME" in proc.stderr


def test_tasks_take_the_options_of_the_verbs_they_wrap() -> None:
    """Every option of an invoke task that wraps a `cbios` verb is an option of that verb, by
    the same name."""
    import tasks

    wrapped = {"build": ("build",), "disk": ("disk",), "boot": ("boot",), "release": ("release",),
               "pxe_serve": ("pxe", "serve"), "publish": ("pxe", "publish"), "pxe_pack": ("pxe", "pack")}
    subs = verbs(parser())
    for task_name, words in wrapped.items():
        body = getattr(tasks, task_name).body
        params = [p for p in body.__code__.co_varnames[1:body.__code__.co_argcount]]
        options = {o for a in subs[words]._actions for o in a.option_strings}
        for param in params:
            assert "--" + param.replace("_", "-") in options, (task_name, param)


def test_bash_completes_profile_names_from_the_project(tmp_path: Path) -> None:
    script = tmp_path / "cbios.bash"
    script.write_text(cbios("completion", "bash").stdout)
    complete = f'source {script}; COMP_WORDS=($WORDS); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); ' \
               '_shtab_cbios; echo "${COMPREPLY[@]}"'

    for words, expected in [("cbios build qemu-test-p", "qemu-test-peer"),
                            ("cbios pxe serve --profile comp", "compute"),
                            ("cbios pro", "profile")]:
        proc = subprocess.run(["bash", "-c", complete], capture_output=True, text=True, cwd=REPO, check=False,
                              env={**os.environ, "WORDS": words})
        assert proc.stdout.split() == [expected], (words, proc.stdout, proc.stderr)
