"""What a peer sent (a PXE client's path, a receipt's fields, a guest's console line), made
safe to log: its control characters shown as escapes, never sent to a terminal, where they
could move the cursor, recolour it or rewrite lines above. Standard library only."""

from __future__ import annotations

import re

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(value: object) -> str:
    return CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", str(value))
