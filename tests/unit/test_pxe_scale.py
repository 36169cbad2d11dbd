"""The PXE scale bench's machinery, on a small sample (`invoke bench-pxe` runs the full counts):
real curl clients against the real `cbios pxe publish` process and a real nginx, no VM."""

from __future__ import annotations

from pathlib import Path

from cbios.pxe import scale
from cbios.pxe.bundle import make_bundle
from tests.unit.test_pxe_bundle import BIG, fake_build


def test_every_client_fetches_and_checks_the_whole_bundle_from_both_servers(tmp_path: Path) -> None:
    bundle = make_bundle(fake_build(tmp_path / "build"))
    figures = scale.measure(bundle, (1, 4))
    assert figures["root_img_bytes"] == BIG
    for server in ("cbios", "nginx"):
        assert [(row["clients"], row["failures"]) for row in figures[server]] == [(1, 0), (4, 0)]
        assert all(row["aggregate_MBps"] > 0 and row["slowest_over_mean"] >= 1 for row in figures[server])
    assert len(figures["cbios_over_nginx"]) == 2


def test_a_client_that_gets_other_bytes_is_a_failure(tmp_path: Path) -> None:
    bundle = make_bundle(fake_build(tmp_path / "build"))
    with scale.nginx_server(bundle, tmp_path / "nginx") as url:
        row = scale.clients(url, 2, "0" * 64, BIG, tmp_path)  # not root.img's sha256
    assert (row["failures"], row["aggregate_MBps"], row["slowest_s"]) == (2, 0.0, None)
