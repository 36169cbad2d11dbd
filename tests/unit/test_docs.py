"""The README's tables and the man page are the code's: a change to a verb, an option, an
exit code or a build's files that the README does not show fails here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cbios import docs
from cbios.artifacts import ARTIFACTS, DISK, RECORD, build_files
from cbios.cli import parser
from cbios.errors import EXIT_CODES
from cbios.manifest import MANIFEST, SIGNATURE, SUMS

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_tables_are_the_codes() -> None:
    readme = (REPO / "README.md").read_text()
    assert docs.refreshed(readme, parser()) == readme, "README.md is behind the code: run 'invoke docs'"


def test_every_leaf_verb_and_option_is_in_the_verbs_table() -> None:
    table = docs.verbs_table(parser())
    for prog, sub, _ in docs.subcommands(parser()):
        row = next(line for line in table.splitlines() if line.startswith(f"| `{prog}"))
        for action in sub._actions:
            if action.option_strings and "--help" not in action.option_strings:
                assert any(o in row for o in action.option_strings), (prog, action.option_strings)
    assert "| `cbios pxe serve " in table and "| `cbios profile list [--json]` |" in table


def test_the_build_files_table_names_what_the_code_names() -> None:
    names = [name for name, _ in build_files()]
    for name in [*ARTIFACTS, MANIFEST, SIGNATURE, SUMS, DISK, RECORD, "pxe/", "work/"]:
        assert name in names


def test_a_readme_without_a_block_is_refused() -> None:
    with pytest.raises(ValueError, match="no block '<!-- verbs"):
        docs.refreshed("# README\n", parser())


def test_the_man_page_has_every_verb_and_the_exit_codes(tmp_path: Path) -> None:
    man = tmp_path / "cbios.1"
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    assert docs.write_docs(readme, man, parser()) == [man]
    page = man.read_text()
    for prog, _, _ in docs.subcommands(parser()):
        assert f"COMMAND \\fI\\,'{prog}'" in page, prog
    assert '.SH "EXIT STATUS"' in page and all(f".B {code}\n" in page for code in EXIT_CODES)
    if shutil.which("groff"):
        proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(man)], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0 and not proc.stderr, proc.stderr
