"""What `cbios pxe serve` shows of its HTTP server's transfers: a row a node (by client
address, with its MAC when it gave one), its latest transfer."""

from __future__ import annotations

from collections.abc import Sequence

from cbios.node.httpd import Transfer
from cbios.progress import TransferRow


def node_rows(transfers: Sequence[Transfer], now: float) -> list[TransferRow]:
    """TRANSFERS (oldest first) as rows, the nodes in the order they first came."""
    latest: dict[str, Transfer] = {}
    macs: dict[str, str] = {}
    for transfer in transfers:
        latest[transfer.client] = transfer
        if transfer.mac != "?":
            macs[transfer.client] = transfer.mac
    return [TransferRow(node=f"{client} {macs[client]}" if client in macs else client, name=t.name,
                        sent=t.sent, size=t.size, seconds=(t.finished or now) - t.started, done=t.done,
                        ended=t.ended.is_set())
            for client, t in latest.items()]
