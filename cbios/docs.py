"""The parts of the docs that the code knows: the README's tables of verbs and of a build's
files, and the man page, all made from the parser and the modules that name the files.
`invoke docs` writes them; a unit test fails when the README is behind the code."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from cbios import __version__
from cbios.errors import EXIT_CODES

BEGIN = "<!-- {name}: made by 'invoke docs' from the code; edit the code, not this table -->"
END = "<!-- end {name} -->"


def commands(p: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """(words, parser, help) of every command under P, each before its own, in the parser's order."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help or "" for c in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*prefix, name), sub, helps[name]
                yield from commands(sub, (*prefix, name))


def subcommands(p: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    """(prog, parser, help) of every leaf command under P: the ones that take no further word."""
    for _, sub, help in commands(p):
        if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            yield sub.prog, sub, help


def _usage(sub: argparse.ArgumentParser) -> str:
    text = " ".join(sub.format_usage().removeprefix("usage: ").split())
    return text.replace(" [-h]", "")


def verbs_table(p: argparse.ArgumentParser) -> str:
    rows = ["| command | what it does |", "|---|---|"]
    for _, sub, help in subcommands(p):
        usage, what = (text.replace("|", "\\|") for text in (_usage(sub), help))
        rows.append(f"| `{usage}` | {what} |")
    return "\n".join(rows)


def exit_codes_table() -> str:
    rows = ["| status | meaning |", "|---|---|"]
    rows += [f"| {code} | {meaning} |" for code, meaning in EXIT_CODES.items()]
    return "\n".join(rows)


def build_files_table() -> str:
    from cbios.artifacts import build_files

    rows = ["| file | what it is |", "|---|---|"]
    rows += [f"| `{name}` | {what} |" for name, what in build_files()]
    return "\n".join(rows)


TABLES: dict[str, Callable[[argparse.ArgumentParser], str]] = {
    "verbs": verbs_table,
    "exit-codes": lambda p: exit_codes_table(),
    "build-files": lambda p: build_files_table(),
}


def _block(name: str) -> re.Pattern[str]:
    begin, end = BEGIN.format(name=name), END.format(name=name)
    return re.compile(re.escape(begin) + r"\n(?:.*?\n)?" + re.escape(end), re.S)


def refreshed(readme: str, p: argparse.ArgumentParser) -> str:
    """README's text with each table block made again; a block it lacks is an error."""
    for name, make in TABLES.items():
        found = _block(name).search(readme)
        if found is None:
            raise ValueError(f"README.md: no block '{BEGIN.format(name=name)}'")
        table = f"{BEGIN.format(name=name)}\n{make(p)}\n{END.format(name=name)}"
        readme = readme[:found.start()] + table + readme[found.end():]
    return readme


def manpage(p: argparse.ArgumentParser) -> str:
    """cbios(1): each command with its options, then the exit status."""
    from argparse_manpage.manpage import Manpage  # type: ignore[import-untyped]

    page = Manpage(p)
    page.source = f"cbios {__version__}"
    page.manual = "CBIOS toolkit"
    page.description = "build CBIOS firmware from profiles, boot it in QEMU, serve it to nodes"
    status = "".join(f".TP\n.B {code}\n{meaning}\n" for code, meaning in EXIT_CODES.items())
    return f"{page}\n.SH \"EXIT STATUS\"\n{status}"


def write_docs(readme: Path, man: Path, p: argparse.ArgumentParser) -> list[Path]:
    """README's tables and the man page, written; the paths that changed."""
    changed = []
    text = readme.read_text()
    new = refreshed(text, p)
    if new != text:
        readme.write_text(new)
        changed.append(readme)
    man.parent.mkdir(parents=True, exist_ok=True)
    page = manpage(p)
    if not man.is_file() or man.read_text() != page:
        man.write_text(page)
        changed.append(man)
    return changed
