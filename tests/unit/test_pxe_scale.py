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


def test_nginx_serves_a_bundle_in_a_folder_of_a_site_and_resumes(tmp_path: Path) -> None:
    import urllib.request

    from cbios.pxe.nginx import Nginx

    bundle = make_bundle(fake_build(tmp_path / "build"))
    (tmp_path / "site" / "cbios").mkdir(parents=True)
    (tmp_path / "site" / "cbios" / "qemu-test").symlink_to(bundle)
    with Nginx(tmp_path / "site", tmp_path / "nginx") as server:
        url = f"http://127.0.0.1:{server.port}/cbios/qemu-test/root.img?mac=52:54:00:c0:00:01"
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=100-"})) as resp:
            assert resp.status == 206 and resp.read() == (bundle / "root.img").read_bytes()[100:]
        server.stop()
        server.start()  # again, on the same port
        with urllib.request.urlopen(url) as resp:
            assert len(resp.read()) == BIG
    assert [(s.status, s.name, s.range, s.sent) for s in server.served()] == [
        (206, "root.img", "bytes=100-", BIG - 100), (200, "root.img", "-", BIG)]
    assert server.bytes_sent("root.img") == 2 * BIG - 100
