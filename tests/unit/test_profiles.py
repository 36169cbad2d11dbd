"""Profiles: loading, extends, and one clear line for every kind of mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from cbios.errors import ProfileError
from cbios.profile import available, load_profile, load_schema
from cbios.project import Project

SHIPPED = ["base", "compute", "qemu-test", "service-node"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load(project: Project, name: str) -> None:
    profile = load_profile(project, name)
    assert profile.name == name
    assert profile.kernel.package == "linux-image-amd64"


def test_available_lists_shipped_profiles(project: Project) -> None:
    assert set(SHIPPED) <= set(available(project))


def test_extends_merges_mappings_and_adds_packages(project: Project) -> None:
    base = load_profile(project, "base")
    compute = load_profile(project, "compute")
    node = load_profile(project, "service-node")
    assert set(base.packages) < set(compute.packages)  # additive down the chain
    assert "openssh-server" in node.packages  # from compute, two levels up
    assert compute.kernel.cmdline == base.kernel.cmdline  # inherited mapping key
    assert compute.kernel.modules != base.kernel.modules  # a plain list replaces
    assert node.storage.vg == "lvm"  # default from base through compute


def test_service_node_declares_the_source_documents_slots(project: Project) -> None:
    node = load_profile(project, "service-node")
    assert node.node.object_id == "31000040010"
    ids = {s.template: node.slot_object_id(s.eid) for s in node.slots}
    assert ids["nfs"] == "31000040175"
    assert ids["dhcp"] == "31000040275"
    assert ids["sysmon"] == "31000040875"
    dhcp = next(s for s in node.slots if s.template == "dhcp")
    assert (dhcp.address, dhcp.hostname) == ("10.0.249.52/24", "dhcpd52")


def test_schema_accepts_every_shipped_profile_file(project: Project) -> None:
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    for name in SHIPPED:
        data = yaml.safe_load((project.profiles / f"{name}.yaml").read_text())
        jsonschema.validate(data, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": "1", "pakages": []}, schema)


# Each bad profile: (file name, text, the one line expected). Line numbers are 1-based.
MANAGER_ON_NET = "slots:\n  - {template: cb-manager, eid: 0, address: 10.0.249.9/24}\n"
PEER_NODE = '    - {object_id: "31000041010", address: 10.0.249.19}\n'
BAD = [
    ("typo", 'extends: base\nversion: "1"\npakages: [x]\n',
     "profiles/typo.yaml:3: pakages: unknown key (did you mean 'packages'?)"),
    ("nested-typo", 'extends: base\nkernel:\n  comdline: [x]\n',
     "profiles/nested-typo.yaml:3: kernel.comdline: unknown key (did you mean 'cmdline'?)"),
    ("duplicate", 'extends: base\nversion: "1"\nboot:\n  tries: 2\n  tries: 3\n',
     "profiles/duplicate.yaml:5: boot.tries: duplicate key (first set on line 4)"),
    ("wrong-type", 'extends: base\nboot:\n  tries: three\n',
     "profiles/wrong-type.yaml:3: boot.tries: Input should be a valid integer (got 'three')"),
    ("wrong-type-list", 'extends: base\npackages: vim\n',
     "profiles/wrong-type-list.yaml:2: packages: Input should be a valid list (got 'vim')"),
    ("unknown-extends", 'extends: bsae\nversion: "1"\n',
     "profiles/unknown-extends.yaml:1: extends: no profile 'bsae' (did you mean 'base'?)"),
    ("self-extends", 'version: "1"\nextends: self-extends\n',
     "profiles/self-extends.yaml:2: extends: cycle of extends: self-extends -> self-extends"),
    ("syntax", 'extends: base\nkernel: [unclosed\n',
     "profiles/syntax.yaml:3: YAML syntax: expected ',' or ']', but got '<stream end>'"),
    ("eid-twice", 'extends: base\nslots:\n  - {template: cb-manager, eid: 0}\n  - {template: dns_master, eid: 2}\n'
     '  - {template: dns_master, eid: 2}\n',
     "profiles/eid-twice.yaml:5: slots[2].eid: eid 2 is already used by slots[1]"),
    ("no-manager", 'extends: base\nslots:\n  - {template: dns_master, eid: 2}\n',
     "profiles/no-manager.yaml:2: slots: a node with slots needs CB-Manager: {template: cb-manager, eid: 0}"),
    ("manager-eid", 'extends: base\nslots:\n  - {template: cb-manager, eid: 0}\n  - {template: dns_master, eid: 0}\n',
     "profiles/manager-eid.yaml:4: slots[1].eid: eid 0 is CB-Manager's, and CB-Manager's only (dns_master at eid 0)"),
    ("slot-address", 'extends: base\nslots:\n  - {template: cb-manager, eid: 0}\n  - {template: dhcp, eid: 2}\n',
     "profiles/slot-address.yaml:4: slots[1]: a dhcp slot needs an address"),
    ("slot-param", 'extends: base\nslots:\n  - {template: cb-manager, eid: 0}\n'
     '  - {template: dhcp, eid: 2, address: 10.0.0.2/24, params: {rnage: x}}\n',
     "profiles/slot-param.yaml:4: slots[1].params.rnage: dhcp has no parameter 'rnage' (did you mean 'range'?)"),
    ("slot-param-type", 'extends: base\nslots:\n  - {template: cb-manager, eid: 0}\n'
     '  - {template: dhcp, eid: 2, address: 10.0.0.2/24, params: {range: "10.0.0.9,10.0.0"}}\n',
     "profiles/slot-param-type.yaml:4: slots[1].params.range: '10.0.0.9,10.0.0' is not the first and last IPv4 "
     "address, e.g. 10.0.249.100,10.0.249.200 (ipv4-range)"),
    ("eid-range", 'extends: base\nslots:\n  - template: dhcp\n    eid: 12\n',
     "profiles/eid-range.yaml:4: slots[0].eid: Input should be less than or equal to 9 (got 12)"),
    ("template", 'extends: base\nslots:\n  - {template: cb-manager, eid: 0}\n  - {template: dchp, eid: 1}\n',
     "profiles/template.yaml:4: slots[1].template: no slot template 'dchp' (did you mean 'dhcp'?)"),
    ("object-id", 'extends: base\nnode:\n  object_id: "3100"\n',
     "profiles/object-id.yaml:3: node.object_id: '3100' is not a node ObjectID "
     "(11 digits ending in 010, e.g. 31000040010)"),
    ("size", 'extends: base\nstorage:\n  root_size: 2 GB\n',
     "profiles/size.yaml:3: storage.root_size: '2 GB' is not a size (a whole number with K, M, G or T, "
     "e.g. 512M)"),
    ("address", 'extends: base\nslots:\n  - {template: dhcp, eid: 1, address: 10.0.249.52}\n',
     "profiles/address.yaml:3: slots[0].address: '10.0.249.52' needs a prefix length (e.g. 10.0.249.52/24)"),
    ("overlay", 'extends: base\noverlays: [nosuch]\n',
     "profiles/overlay.yaml:2: overlays[1]: no overlay 'nosuch' in overlays/"),
    ("missing-version", "packages: [systemd]\n",
     "profiles/missing-version.yaml:1: version: required key is missing"),
    ("name", 'extends: base\nname: other\n',
     "profiles/name.yaml:2: name: 'other' does not match the file name 'name'"),
    ("hostname", 'extends: base\nnode:\n  hostname: Bad_Host\n',
     "profiles/hostname.yaml:3: node.hostname: 'Bad_Host' is not a host name "
     "(lower-case letters, digits and '-', 1 to 63)"),
    ("password", 'extends: base\nusers:\n  - name: root\n  - name: ops\n    password_hash: x\n',
     "profiles/password.yaml:5: users[1].password_hash: a password can be set for root only"),
    ("top-list", "- a\n- b\n", "profiles/top-list.yaml:1: (top level): a profile is a mapping of keys"),
    ("mac", 'extends: base\nnetwork:\n  nics:\n    - {name: ctl, mac: "52:54:00:zz:00:01"}\n',
     "profiles/mac.yaml:4: network.nics[0].mac: '52:54:00:zz:00:01' is not a MAC address "
     "(lower-case, e.g. 52:54:00:12:34:56)"),
    ("version", 'extends: base\nversion: v1\n',
     "profiles/version.yaml:2: version: String should match pattern '^\\d+(\\.\\d+){0,3}$' (got 'v1')"),
    ("key-type", 'extends: base\n1: x\n', "profiles/key-type.yaml:2: (top level): key 1 is not a string"),
    ("nic-twice", 'extends: base\nnetwork:\n  nics:\n    - {name: ctl, mac: "52:54:00:00:00:01"}\n'
     '    - {name: ctl, mac: "52:54:00:00:00:02"}\n',
     "profiles/nic-twice.yaml:5: network.nics[1].name: NIC 'ctl' is declared twice"),
    ("mac-twice", 'extends: base\nnetwork:\n  nics:\n    - {name: ctl, mac: "52:54:00:00:00:01"}\n'
     '    - {name: mgt, mac: "52:54:00:00:00:01"}\n',
     "profiles/mac-twice.yaml:5: network.nics[1].mac: 52:54:00:00:00:01 is already nics[0]'s"),
    ("key-mapping", 'extends: base\n? {a: 1}\n: x\n',
     "profiles/key-mapping.yaml:2: (top level): a key is not a string"),
    ("no-key", 'extends: base\nupdate:\n  signing_key: keys/none.pem\n',
     "profiles/no-key.yaml:3: update.signing_key: no such file: keys/none.pem (from .)"),
    ("cluster-key", f'extends: base\n{MANAGER_ON_NET}cluster:\n  key: profiles/keys/k.key\n  nodes:\n{PEER_NODE}',
     "profiles/cluster-key.yaml:5: cluster.key: the cluster key is no part of a profile: no firmware may hold it "
     "(set it on each node with `cbios cluster set-key`)"),
    ("cluster-twice", f'extends: base\n{MANAGER_ON_NET}cluster:\n  nodes:\n{PEER_NODE}'
     '    - {object_id: "31000041010", address: 10.0.249.29}\n',
     "profiles/cluster-twice.yaml:7: cluster.nodes[1].object_id: 31000041010 is already nodes[0]"),
    ("cluster-manager", f'extends: base\ncluster:\n  nodes:\n{PEER_NODE}',
     "profiles/cluster-manager.yaml:2: cluster: CB-Manager answers the cluster on its own address: give slot 0 "
     "one ({template: cb-manager, eid: 0, address: A.B.C.D/N})"),
    ("cluster-address", 'extends: base\ncluster:\n  nodes:\n    - {object_id: "31000041010", '
     'address: 10.0.249.19/24}\n',
     "profiles/cluster-address.yaml:4: cluster.nodes[0].address: '10.0.249.19/24' is not an IPv4 address "
     "(e.g. 10.0.249.9)"),
]


@pytest.mark.parametrize(("name", "text", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_profile_gives_one_line_naming_file_line_and_key(
        tmp_project: Project, monkeypatch: pytest.MonkeyPatch, name: str, text: str, expected: str) -> None:
    monkeypatch.chdir(tmp_project.root)
    (tmp_project.profiles / f"{name}.yaml").write_text(text)
    with pytest.raises(ProfileError) as err:
        load_profile(tmp_project, name)
    assert err.value.problems == [expected]


def test_cycle_through_two_profiles(tmp_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_project.root)
    (tmp_project.profiles / "a.yaml").write_text('version: "1"\nextends: b\n')
    (tmp_project.profiles / "b.yaml").write_text('extends: a\n')
    with pytest.raises(ProfileError) as err:
        load_profile(tmp_project, "a")
    assert err.value.problems == ["profiles/b.yaml:1: extends: cycle of extends: a -> b -> a"]


def test_error_in_a_parent_names_the_parents_file(tmp_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_project.root)
    (tmp_project.profiles / "mid.yaml").write_text('extends: base\nboot:\n  tries: 0\n')
    (tmp_project.profiles / "leaf.yaml").write_text('extends: mid\nversion: "2"\n')
    with pytest.raises(ProfileError) as err:
        load_profile(tmp_project, "leaf")
    assert err.value.problems == [
        "profiles/mid.yaml:3: boot.tries: Input should be greater than or equal to 1 (got 0)"]


def test_every_problem_is_listed_at_once(tmp_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_project.root)
    (tmp_project.profiles / "many.yaml").write_text('extends: base\nboot: {tries: x}\nqemu: {cpu: 2}\n')
    with pytest.raises(ProfileError) as err:
        load_profile(tmp_project, "many")
    assert len(err.value.problems) == 2
    assert err.value.problems[1].startswith("profiles/many.yaml:3: qemu.cpu: unknown key (did you mean 'cpus'?)")


def _cli(tmp_project: Project, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CBIOS_PROJECT": str(tmp_project.root),
           "CBIOS_BUILD_DIR": str(tmp_project.root / "build")}
    return subprocess.run([sys.executable, "-m", "cbios.cli", *argv], capture_output=True, text=True,
                          env=env, cwd=tmp_project.root, check=False)


# Bytes YAML refuses, and aliases that expand without bound: one line, before any work.
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
BAD_BYTES = [
    ("nul", b'extends: base\nversion: "1\x00"\n', "profiles/nul.yaml:2: a NUL byte: a profile is UTF-8 text"),
    ("latin1", b'extends: base\n\nnode:\n  hostname: caf\xe9\n',
     "profiles/latin1.yaml:4: byte 0xe9 is not UTF-8: a profile is UTF-8 text"),
    ("control", b'extends: base\nversion: "1\x07"\n',
     "profiles/control.yaml:2: character U+0007 is not allowed in YAML"),
    ("laughs", f"extends: base\n{LAUGHS}".encode(),
     "profiles/laughs.yaml:5: d[0]: aliases expand to more than 1000 nodes"),
]


@pytest.mark.parametrize(("name", "raw", "expected"), BAD_BYTES, ids=[b[0] for b in BAD_BYTES])
def test_profile_yaml_refuses_gives_one_line(tmp_project: Project, name: str, raw: bytes, expected: str) -> None:
    (tmp_project.profiles / f"{name}.yaml").write_bytes(raw)
    proc = _cli(tmp_project, "profile", "show", name)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [expected]


def test_a_few_aliases_are_a_profile(tmp_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_project.root)
    (tmp_project.profiles / "anchored.yaml").write_text(
        "extends: base\npackages: &p [vim, less]\nkernel: {cmdline: *p}\n")
    assert "less" in load_profile(tmp_project, "anchored").kernel.cmdline


@pytest.mark.parametrize("target", ["outside.yaml", "../outside.yaml"])
def test_profile_leading_out_of_profiles_is_not_read(tmp_project: Project, target: str) -> None:
    secret = tmp_project.root / "outside.yaml"
    secret.write_text("root-password: hunter2\n")
    (tmp_project.profiles / "link.yaml").symlink_to(target if target.startswith("..") else secret)
    for argv in (("profile", "show", "link"), ("build", "link")):
        proc = _cli(tmp_project, *argv)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == ["profiles/link.yaml: leads out of profiles/ (a profile is a file there, "
                                            "not a link elsewhere)"]
        assert "hunter2" not in proc.stderr + proc.stdout
    (tmp_project.profiles / "child.yaml").write_text("extends: link\n")
    proc = _cli(tmp_project, "profile", "show", "child")
    assert proc.returncode == 2 and "leads out of profiles/" in proc.stderr and "hunter2" not in proc.stderr


def _snapshot(path: Path) -> list[tuple[str, int, float]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime) for p in path.rglob("*")) if path.exists() else []


@pytest.mark.parametrize(("name", "text", "expected"), [BAD[0], BAD[2], BAD[3], BAD[5]],
                         ids=["typo", "duplicate", "wrong-type", "unknown-extends"])
def test_cli_bad_profile_exit_2_one_line_and_build_untouched(
        tmp_project: Project, name: str, text: str, expected: str) -> None:
    (tmp_project.profiles / f"{name}.yaml").write_text(text)
    build = tmp_project.root / "build"
    (build / "other").mkdir(parents=True)
    (build / "other" / "manifest.json").write_text("{}")
    before = _snapshot(build)
    for argv in (("build", name), ("profile", "show", name)):
        proc = _cli(tmp_project, *argv)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == [expected]
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert _snapshot(build) == before
    assert not (build / name).exists()


def test_cli_debug_shows_traceback(tmp_project: Project) -> None:
    (tmp_project.profiles / "typo.yaml").write_text(BAD[0][1])
    proc = _cli(tmp_project, "--debug", "profile", "show", "typo")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


def test_cli_show_prints_the_resolved_profile(tmp_project: Project) -> None:
    (tmp_project.profiles / "leaf.yaml").write_text('extends: base\nversion: "2.0"\npackages: [lvm2]\n')
    proc = _cli(tmp_project, "profile", "show", "leaf", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["name"] == "leaf" and data["version"] == "2.0"
    assert data["packages"] == ["systemd", "udev", "lvm2"]
    assert data["kernel"]["cmdline"] == ["quiet"]
    assert data["boot"]["tries"] == 3  # a default, filled in


def test_cli_schema_is_json(tmp_project: Project) -> None:
    proc = _cli(tmp_project, "profile", "schema")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["title"] == "CBIOS profile"


def test_only_a_test_profile_carries_test_material(tmp_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real node's firmware that extends a test profile does not inherit its key, its back
    door or its empty password: each is one line naming where it came from."""
    monkeypatch.chdir(tmp_project.root)
    (tmp_project.overlays / "test-door").mkdir()
    (tmp_project.test_keys).mkdir()
    (tmp_project.test_keys / "test.pem").write_text("key\n")
    (tmp_project.profiles / "lab.yaml").write_text(
        'extends: base\ntest: true\noverlays: [test-door]\nupdate: {signing_key: profiles/keys/test.pem}\n'
        'users: [{name: root, password_hash: ""}]\n')
    assert load_profile(tmp_project, "lab").test
    (tmp_project.profiles / "real.yaml").write_text('extends: lab\ntest: false\n')
    with pytest.raises(ProfileError) as e:
        load_profile(tmp_project, "real")
    problems = e.value.problems
    assert len(problems) == 3, problems
    assert all(p.startswith("profiles/lab.yaml:") and "for tests only, and 'real' is no test profile" in p
               for p in problems), problems
    assert any("overlay 'test-door'" in p for p in problems)
    assert any("profiles/keys/test.pem, a public test key" in p for p in problems)
    assert any("an empty password" in p for p in problems)
    (tmp_project.root / "copied.pem").write_text("key\n")  # the test key, copied out of profiles/keys/
    (tmp_project.profiles / "copy.yaml").write_text('extends: base\nupdate: {signing_key: copied.pem}\n')
    with pytest.raises(ProfileError, match=r"copied\.pem, a public test key"):
        load_profile(tmp_project, "copy")


def test_the_shipped_real_profiles_are_not_test_profiles(project: Project) -> None:
    for name in ("base", "compute", "service-node"):
        assert not load_profile(project, name).test
    assert load_profile(project, "qemu-test-peer").test
