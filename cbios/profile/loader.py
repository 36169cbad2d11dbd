"""Profiles from files: `extends:` chains, strict validation, errors with file:line: key.

Mappings merge key by key down an `extends:` chain; lists replace, except the additive
ones below, where a child adds to what its parent declared."""

from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

import pydantic

from cbios.errors import ProfileError
from cbios.node import slotparams
from cbios.profile import template as slot_template
from cbios.profile.model import Profile
from cbios.profile.yamlload import KeyPath, Located, YamlError, format_path, load_yaml
from cbios.project import Project

ADDITIVE: frozenset[KeyPath] = frozenset({("packages",), ("overlays",), ("kernel", "cmdline")})

Origin = tuple[str, int]


class _Problems(Exception):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems


def available(project: Project) -> list[str]:
    return sorted(p.stem for p in project.profiles.glob("*.yaml"))


def profile_file(project: Project, name: str) -> Path:
    """profiles/NAME.yaml; ProfileError if it is not there, or leads out of profiles/ (a
    symbolic link, or a NAME with a '/'): nothing outside the project's profiles is read."""
    path = project.profiles / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available(project)) or "none"
        raise ProfileError([f"{project.display(path)}: no such profile '{name}' (known: {known})"])
    if not path.resolve().is_relative_to(project.profiles.resolve()) or "/" in name:
        where = project.display(project.profiles)
        raise ProfileError([f"{where}/{name}.yaml: leads out of {where}/ (a profile is a file there, "
                            "not a link elsewhere)"])
    return path


def load_profile(project: Project, name: str) -> Profile:
    """Resolve and validate profile NAME; raise ProfileError listing every problem."""
    try:
        data, origins = _resolve(project, name, [], None)  # profile_file: not found, or out of profiles/
    except YamlError as e:
        raise ProfileError([str(e)]) from None
    except _Problems as e:
        raise ProfileError(e.problems) from None
    leaf = project.display(project.profiles / f"{name}.yaml")
    if data.get("name", name) != name:
        line = origins.get(("name",), (leaf, 1))[1]
        raise ProfileError([f"{leaf}:{line}: name: '{data['name']}' does not match the file name '{name}'"])
    data["name"] = name
    try:
        profile = Profile.model_validate(data)
    except pydantic.ValidationError as e:
        raise ProfileError([_describe(err, origins, leaf) for err in e.errors()]) from None
    problems = [_at(origins, leaf, path_, msg) for path_, msg in semantic_problems(project, profile)]
    if problems:
        raise ProfileError(problems)
    return profile


def profile_hash(profile: Profile) -> str:
    """sha256 of the resolved profile, canonical JSON."""
    blob = json.dumps(profile.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def semantic_problems(project: Project, profile: Profile) -> list[tuple[KeyPath, str]]:
    """Rules across fields, and against the project's files."""
    out: list[tuple[KeyPath, str]] = []
    for i, overlay in enumerate(profile.overlays):
        if not (project.overlays / overlay).is_dir():
            out.append((("overlays", i), f"no overlay '{overlay}' in {project.display(project.overlays)}/"))
    out += _slot_problems(project, profile)
    key = profile.update.signing_key
    if key is not None and not (project.root / key).is_file():
        out.append((("update", "signing_key"), f"no such file: {key} (from {project.display(project.root)})"))
    out += _cluster_problems(profile)
    nics = [n.name for n in profile.network.nics]
    for i, nic in enumerate(nics):
        if nic in nics[:i]:
            out.append((("network", "nics", i, "name"), f"NIC '{nic}' is declared twice"))
    macs = [n.mac for n in profile.network.nics]
    for i, mac in enumerate(macs):
        if mac in macs[:i]:
            out.append((("network", "nics", i, "mac"), f"{mac} is already nics[{macs.index(mac)}]'s"))
    for i, user in enumerate(profile.users):
        if user.password_hash is not None and user.name != "root":
            out.append((("users", i, "password_hash"), "a password can be set for root only"))
    if not profile.test:
        out += _test_material(project, profile)
    return out


TEST_OVERLAY_PREFIX = "test-"


def _is_test_key(project: Project, key: Path) -> bool:
    """KEY is one of the test keys, where they are or copied elsewhere."""
    if key.resolve().is_relative_to(project.test_keys.resolve()):
        return True
    try:
        body = key.read_bytes()
    except OSError:
        return False  # said already: no such file
    return any(test.is_file() and body == test.read_bytes() for test in project.test_keys.glob("*"))


def _test_material(project: Project, profile: Profile) -> list[tuple[KeyPath, str]]:
    """What only a `test: true` profile may carry: a real node's firmware never inherits a
    public key, a back door or an empty password from the profile it extends."""
    why = f"is for tests only, and '{profile.name}' is no test profile (`test: true`)"
    out: list[tuple[KeyPath, str]] = []
    for i, overlay in enumerate(profile.overlays):
        if overlay.startswith(TEST_OVERLAY_PREFIX):
            out.append((("overlays", i), f"overlay '{overlay}' {why}"))
    key = profile.update.signing_key
    if key is not None and _is_test_key(project, project.root / key):
        out.append((("update", "signing_key"), f"{key}, a public test key, {why}"))
    for i, user in enumerate(profile.users):
        if user.password_hash == "":
            out.append((("users", i, "password_hash"), f"an empty password {why}"))
    return out


def _cluster_problems(profile: Profile) -> list[tuple[KeyPath, str]]:
    cluster = profile.cluster
    if not cluster.nodes:
        return []
    out: list[tuple[KeyPath, str]] = []
    seen: dict[str, int] = {}
    for i, node in enumerate(cluster.nodes):
        if node.object_id in seen:
            out.append((("cluster", "nodes", i, "object_id"),
                        f"{node.object_id} is already nodes[{seen[node.object_id]}]"))
        seen.setdefault(node.object_id, i)
    manager = next((s for s in profile.slots if s.eid == slot_template.MANAGER_EID), None)
    if manager is None or manager.address is None:
        out.append((("cluster",), "CB-Manager answers the cluster on its own address: give slot 0 one "
                    "({template: cb-manager, eid: 0, address: A.B.C.D/N})"))
    return out


def _slot_problems(project: Project, profile: Profile) -> list[tuple[KeyPath, str]]:
    out: list[tuple[KeyPath, str]] = []
    known = slot_template.available(project)
    eids: dict[int, int] = {}
    for i, slot in enumerate(profile.slots):
        if slot.template not in known:
            out.append((("slots", i, "template"),
                        f"no slot template '{slot.template}'{_suggest(slot.template, known)}"))
            continue
        template = slot_template.load_template(project, slot.template)
        if (slot.template == slot_template.MANAGER) != (slot.eid == slot_template.MANAGER_EID):
            out.append((("slots", i, "eid"), f"eid {slot_template.MANAGER_EID} is CB-Manager's, and CB-Manager's "
                        f"only ({slot.template} at eid {slot.eid})"))
        elif slot.eid in eids:
            out.append((("slots", i, "eid"), f"eid {slot.eid} is already used by slots[{eids[slot.eid]}]"))
        eids.setdefault(slot.eid, i)
        iids = [v.iid for v in slot.volumes]
        if len(set(iids)) != len(iids):
            out.append((("slots", i, "volumes"), "two volumes with the same iid"))
        elif slot.volumes and 0 not in iids:
            out.append((("slots", i, "volumes"), "a slot needs volume iid 0"))
        if template.address == "required" and slot.address is None:
            out.append((("slots", i), f"a {slot.template} slot needs an address"))
        for key, value in slot.params.items():
            if key not in template.params:
                out.append((("slots", i, "params", key), f"{slot.template} has no parameter '{key}'"
                            f"{_suggest(key, sorted(template.params))}"))
                continue
            declared = template.params[key]
            try:
                slotparams.check(declared.type, declared.default, value)
            except ValueError as e:
                out.append((("slots", i, "params", key), f"'{value}' is not {e} ({declared.type})"))
    if profile.slots and slot_template.MANAGER_EID not in eids:
        out.append((("slots",), f"a node with slots needs CB-Manager: {{template: {slot_template.MANAGER}, "
                    f"eid: {slot_template.MANAGER_EID}}}"))
    return out


# -- extends --------------------------------------------------------------------------

def _resolve(project: Project, name: str, chain: list[str],
             referrer: tuple[str, int] | None) -> tuple[dict[str, Any], dict[KeyPath, Origin]]:
    path = profile_file(project, name)
    doc = load_yaml(path, project.display(path))
    if not isinstance(doc.data, dict):
        raise _Problems([f"{doc.file}:1: (top level): a profile is a mapping of keys"])
    parent = doc.data.get("extends")
    if parent is None:
        return doc.data, {p: (doc.file, line) for p, line in doc.lines.items()}
    line = doc.lines[("extends",)]
    if not isinstance(parent, str):
        raise _Problems([f"{doc.file}:{line}: extends: must be the name of a profile"])
    if parent in chain or parent == name:
        cycle = " -> ".join([*chain, name, parent])
        raise _Problems([f"{doc.file}:{line}: extends: cycle of extends: {cycle}"])
    if "/" not in parent and not (project.profiles / f"{parent}.yaml").is_file():
        known = available(project)
        raise _Problems([f"{doc.file}:{line}: extends: no profile '{parent}'{_suggest(parent, known)}"])
    base, origins = _resolve(project, parent, [*chain, name], (doc.file, line))
    merged = _merge(base, doc.data, (), origins, doc)
    return merged, origins


def _merge(base: Any, over: Any, path: KeyPath, origins: dict[KeyPath, Origin], child: Located) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            sub = (*path, key)
            origins[sub] = (child.file, child.lines[sub])
            out[key] = _merge(base[key], value, sub, origins, child) if key in base else _adopt(
                value, sub, origins, child)
        return out
    if path in ADDITIVE and isinstance(base, list) and isinstance(over, list):
        out_list = list(base)
        for i, item in enumerate(over):
            if item not in out_list:
                origins[(*path, len(out_list))] = (child.file, child.lines[(*path, i)])
                out_list.append(item)
        return out_list
    for stale in [p for p in origins if len(p) > len(path) and p[: len(path)] == path]:
        del origins[stale]
    return _adopt(over, path, origins, child)


def _adopt(value: Any, path: KeyPath, origins: dict[KeyPath, Origin], child: Located) -> Any:
    for p, line in child.lines.items():
        if len(p) > len(path) and p[: len(path)] == path:
            origins[p] = (child.file, line)
    return value


# -- messages -------------------------------------------------------------------------

def _at(origins: dict[KeyPath, Origin], leaf: str, path: KeyPath, message: str) -> str:
    for n in range(len(path), 0, -1):
        if path[:n] in origins:
            file, line = origins[path[:n]]
            return f"{file}:{line}: {format_path(path)}: {message}"
    return f"{leaf}:1: {format_path(path)}: {message}"


def _describe(err: Any, origins: dict[KeyPath, Origin], leaf: str) -> str:
    loc: KeyPath = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden" and loc == ("cluster", "key"):
        message = ("the cluster key is no part of a profile: no firmware may hold it (set it on each node "
                   "with `cbios cluster set-key`)")
    elif kind == "extra_forbidden":
        known = _fields_at(loc[:-1])
        message = f"unknown key{_suggest(str(loc[-1]), known)}"
    elif kind == "missing":
        message = "required key is missing"
    else:
        message = err["msg"].removeprefix("Value error, ")
        if kind not in ("value_error",) and not isinstance(err.get("input"), dict | list):
            message += f" (got {err['input']!r})"
    return _at(origins, leaf, loc, message)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (known: {', '.join(choices)})" if choices else ""


def _fields_at(path: KeyPath) -> list[str]:
    """The keys a mapping at PATH may hold, for did-you-mean hints."""
    model: Any = Profile
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if _is_model(model) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
    return sorted(model.model_fields) if _is_model(model) else []


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, pydantic.BaseModel)


def _model_in(annotation: Any) -> Any:
    if _is_model(annotation):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def load_schema() -> dict[str, Any]:
    """JSON Schema of a profile file, for editors."""
    schema = Profile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "CBIOS profile"
    schema.setdefault("properties", {})["name"]["description"] = "defaults to the file name"
    schema["required"] = [r for r in schema.get("required", []) if r != "name"]
    return schema

