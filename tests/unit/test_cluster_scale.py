"""The cluster bench's machinery on a small sample (`invoke bench-cluster` runs 100 peers):
real peer processes of the project's cluster code on loopback addresses of their own, some
stopped; every listing has a row for each peer, and one UNREACHABLE row for each stopped one."""

from __future__ import annotations

from cbios import cluster_scale
from cbios.ports import free_port


def test_every_peer_is_listed_and_a_stopped_one_is_one_unreachable_row() -> None:
    figures = cluster_scale.measure(count=5, unreachable=2, runs=1, port=free_port())
    slots = len(cluster_scale.SLOT_TYPES)
    up, down = figures["all_reachable"], figures["2_unreachable"]
    assert (up["slot_show"]["rows"], up["slot_show"]["unreachable_rows"]) == (6 * slots, 0)
    assert (up["slot_show_by_type_sysmon"]["rows"], up["slot_show_by_type_sysmon"]["unreachable_rows"]) == (6, 0)
    assert (down["slot_show"]["rows"], down["slot_show"]["unreachable_rows"]) == (4 * slots + 2, 2)
    assert (down["slot_show_by_type_sysmon"]["rows"], down["slot_show_by_type_sysmon"]["unreachable_rows"]) == (6, 2)
