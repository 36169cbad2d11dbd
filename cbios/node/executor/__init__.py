"""CB-Executor: the host daemon that does the node's privileged work for CB-Manager.

Slot volumes (LVs slot<eid>-<iid> in the node's VG, and nothing else), LXC containers
slot<eid> (configuration written here from a checked definition, never taken from the
caller), their veths on the bridge, and the VMs of kvm-system slots (kvm.py). Requests
come on a UNIX socket (wire.py); each is checked in full (requests.py) before anything is
done, and logged to the journal."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cbios.node import contract, files, wire
from cbios.node.boot import bootenv
from cbios.node.command import run as _run
from cbios.node.executor import kvm, lxcconf, receipts, requests
from cbios.node.wire import Failed, Invalid

log = logging.getLogger("cbios")
LXC_PATH = Path("/var/lib/lxc")
MOUNTS = Path("/run/cbios/executor-mnt")
SIDE_FILE = "cbios.json"  # the checked definition, beside LXC's config
HEALTH_TIMEOUT = 30
LOG_CHECK = 60  # s between checks of the logs that grow while slots run


class Executor:
    def __init__(self, config: dict[str, Any], catalogue: dict[str, dict[str, Any]],
                 templates: Path = contract.TEMPLATES, images: Path = contract.IMAGES) -> None:
        self.vg: str = config["vg"]
        self.bridge: str = config["bridge"]
        self.node_id: str = config["node"]["object_id"]
        self.catalogue = catalogue
        self.templates = templates
        self.images = images
        self.lock = threading.RLock()  # one change at a time: LVM and LXC state stay coherent
        self.updating = threading.Lock()

    # -- dispatch ------------------------------------------------------------------

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        checked = requests.check(op, args)
        method = getattr(self, "op_" + op.replace(".", "_"))
        if op in ("hello", "volume.list", "container.state", "container.list", "container.runtime",
                  "container.health", "firmware.update"):  # an update has its own lock: slots go on
            return method(**checked)
        with self.lock:
            log.info("%s %s", op, json.dumps(checked, sort_keys=True)[:300])
            result = method(**checked)
            log.info("%s done", op)
            return result

    def op_firmware_update(self, source: str, allow_downgrade: bool = False, reboot: bool = False) -> dict[str, Any]:
        """`cbios update` for CB-Manager: the copy that is not running, then (REBOOT) a reboot."""
        # Imported here: its HTTP client is a third of the executor's imports, which every
        # boot waits for (seconds under TCG), and few boots update.
        from cbios.node import update

        if not self.updating.acquire(blocking=False):
            raise Failed("firmware.update: an update is already running")
        try:
            log.info("firmware.update %s", source)
            result = update.update(update.node_here(), source, allow_downgrade=allow_downgrade,
                                   say=lambda line: log.info("update: %s", line))
        except update.UpdateError as e:
            raise Invalid(f"firmware.update: {e}") from None
        except (OSError, bootenv.BootEnvError) as e:
            raise Failed(f"firmware.update: {e}") from None
        finally:
            self.updating.release()
        if reboot:
            subprocess.run(["systemctl", "--no-block", "reboot"], check=False, stdin=subprocess.DEVNULL)
        return result

    def op_hello(self) -> dict[str, Any]:
        return {"protocol": wire.PROTOCOL, "node": self.node_id, "vg": self.vg,
                "requests": sorted(requests.REQUESTS)}

    # -- volumes -------------------------------------------------------------------

    def _template(self, name: str) -> dict[str, Any]:
        if name not in self.catalogue:
            raise Invalid(f"no template '{name}' in this firmware (known: {', '.join(sorted(self.catalogue))})")
        return self.catalogue[name]

    def _device(self, volume: str) -> str:
        return f"/dev/{self.vg}/{volume}"

    def op_volume_list(self) -> list[dict[str, Any]]:
        out = _run(["lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator", ":",
                    "-o", "lv_name,lv_size", self.vg])
        vols = []
        for line in out.split():
            name, _, size = line.partition(":")
            if contract.VOLUME_NAME.fullmatch(name):
                vols.append({"volume": name, "size": int(size), "device": f"/dev/mapper/{self.vg}-{name}"})
        return vols

    def _exists(self, volume: str) -> bool:
        return any(v["volume"] == volume for v in self.op_volume_list())

    def _need(self, volume: str) -> None:
        if not self._exists(volume):
            raise Invalid(f"no volume {volume} in {self.vg}")

    def _stopped(self, eid: int, what: str) -> None:
        """Refuse WHAT unless slot EID is stopped; then its volumes are the node's alone."""
        if self._state(eid)["state"] not in ("STOPPED", "UNDEFINED"):
            raise Invalid(f"slot {eid} is running: stop it before {what}")
        self._release(eid)

    def _mount_volumes(self, eid: int, volumes: list[int], privileged: bool) -> None:
        """An lxc slot's volumes, mounted on the node for LXC to bind in (the kernel mounts
        no block device in a user namespace). nodev: no device node on a volume opens
        anything. They stay mounted while the slot runs, and after it stops by itself, until
        something else needs the volume (_stopped). Their directory is the node's root's and
        the slot's root's alone (0710, its group): what the slot wrote there, a setuid file
        among them, is out of reach of every other user of the node."""
        top = contract.slot_mounts(eid)
        top.mkdir(parents=True, exist_ok=True)
        os.chown(top, 0, 0 if privileged else contract.slot_ids(eid))
        os.chmod(top, 0o710)
        for iid in volumes:
            target = contract.slot_mount(eid, iid)
            target.mkdir(parents=True, exist_ok=True)
            if not os.path.ismount(target):
                _run(["mount", "-o", "nodev", self._device(contract.volume_name(eid, iid)), str(target)])

    def _make_targets(self, eid: int, volumes: list[int]) -> None:
        """An lxc-system slot's mount points for its further volumes, in its own root (LXC
        binds an idmapped mount only onto a directory that is there), made without following
        a link the slot may have planted on the way."""
        root = contract.slot_mount(eid, 0)
        for iid in volumes:
            if iid != 0:
                target = contract.volume_target("lxc-system", iid)
                os.close(_directory(root, target.split("/"), f"{contract.volume_name(eid, 0)}: /{target}"))

    def _mount_store(self, eid: int) -> None:
        """CB-Manager's image store, for a slot that serves it: its volume mounted again, this
        mount read-only (the file system stays writable for CB-Manager, which mounts it too)."""
        store = contract.volume_name(contract.MANAGER_EID, contract.IMAGE_STORE_IID)
        target = contract.slot_mounts(eid) / contract.STORE_MOUNT
        target.mkdir(exist_ok=True)
        if os.path.ismount(target):
            return
        self._need(store)
        _run(["mount", "-o", "nodev,nosuid,noexec", self._device(store), str(target)])
        _run(["mount", "-o", "remount,bind,ro,nodev,nosuid,noexec", str(target)])

    def _release(self, eid: int) -> None:
        for target in sorted(contract.slot_mounts(eid).glob("*")):
            if os.path.ismount(target):
                _run(["umount", str(target)])

    def op_volume_create(self, volume: str, size: int) -> dict[str, Any]:
        if self._exists(volume):
            raise Invalid(f"volume {volume} already exists")
        _run(["lvcreate", "--yes", "--wipesignatures", "y", "--zero", "y", "-n", volume, "-L", f"{size}b", self.vg])
        _run(["udevadm", "settle", "--timeout=30"])
        return {"volume": volume, "device": f"/dev/mapper/{self.vg}-{volume}"}

    def op_volume_remove(self, volume: str) -> None:
        self._need(volume)
        eid = int(volume[4])
        self._stopped(eid, f"removing {volume}")
        _run(["lvremove", "--yes", f"{self.vg}/{volume}"])

    def op_volume_write(self, volume: str, template: str, if_blank: bool = False) -> dict[str, Any]:
        """Fill a volume from the template baked into this firmware: an lxc-system's or a
        kvm-system's image for its volume 0, else a fresh ext4 with the template's volume/ tree."""
        tpl = self._template(template)
        self._need(volume)
        eid, iid = int(volume[4]), int(volume[6])
        self._stopped(eid, f"writing {volume}")
        dev = self._device(volume)
        if if_blank and _has_signature(dev):
            return {"written": False}
        if tpl["type"] in ("lxc-system", "kvm-system") and iid == 0:
            image = self.images / template
            if not image.is_dir():
                raise Failed(f"{image}: no image of {template} in this firmware")
            _run(["mkfs.ext4", "-q", "-F", "-L", volume, "-d", str(image), dev], timeout=600)
        else:
            seed = self.templates / template / "volume"
            argv = ["mkfs.ext4", "-q", "-F", "-L", volume, "-E", "root_owner=0:0"]
            if iid == 0 and seed.is_dir():
                argv += ["-d", str(seed)]
            _run([*argv, dev], timeout=300)
        return {"written": True}

    @contextmanager
    def _mounted(self, volume: str, *, read_only: bool = False) -> Iterator[Path]:
        target = MOUNTS / volume
        target.mkdir(parents=True, exist_ok=True)
        # noload: a read-only mount that does not replay the journal, so the volume is not written.
        _run(["mount", "-o", "nodev,nosuid,noexec" + (",ro,noload" if read_only else ""), self._device(volume),
              str(target)])
        try:
            yield target
        finally:
            _run(["umount", str(target)])

    def op_volume_put(self, volume: str, path: str, content: str) -> None:
        """Write one file inside a volume. Every directory on the way is opened without
        following symbolic links, so a link planted in the volume cannot lead out of it; what
        is already at PATH must be a regular file (a FIFO planted there would block the
        write, and with it every request after it). The file is replaced whole: a new one,
        written and synced, renamed over it."""
        self._need(volume)
        self._stopped(int(volume[4]), f"writing into {volume}")
        with self._mounted(volume) as root:
            parts = path.split("/")
            fd = _directory(root, parts[:-1], f"{volume}: {path}")
            try:
                _replace(fd, parts[-1], content.encode(), f"{volume}: {path}")
            finally:
                os.close(fd)

    # -- containers ----------------------------------------------------------------

    def _definition(self, eid: int) -> dict[str, Any] | None:
        side = LXC_PATH / contract.container_name(eid) / SIDE_FILE
        try:
            data: dict[str, Any] = json.loads(side.read_text())
            return data
        except (OSError, ValueError):
            return None

    def op_container_define(self, eid: int, template: str, volumes: list[int], hostname: str | None = None,
                            address: str | None = None, memory: int | None = None, pids: int | None = None) -> None:
        tpl = self._template(template)
        if (template == contract.MANAGER_TEMPLATE) != (eid == contract.MANAGER_EID):
            # CB-Manager's container holds this executor's socket: one, at its own place.
            manager, place = contract.MANAGER_TEMPLATE, contract.MANAGER_EID
            raise Invalid(f"slot {place} is {manager}, and {manager} only slot {place} (asked: {template} at {eid})")
        self._stopped(eid, "redefining it")
        for iid in volumes:
            self._need(contract.volume_name(eid, iid))
        arch = tpl.get("architecture", contract.NODE_ARCHITECTURE)
        side = {"eid": eid, "template": template, "kind": tpl["type"], "hostname": hostname,
                "address": address, "volumes": volumes, "privileged": tpl.get("privileged"),
                "image_store": bool(tpl.get("image_store")), "architecture": arch}
        cdir = LXC_PATH / contract.container_name(eid)
        if tpl["type"] == "kvm-system":  # no LXC configuration: the VM's settings are the template's
            side["vm"] = {"memory": tpl["vm"]["memory"], "cpus": tpl["vm"]["cpus"]}
            (cdir / "config").unlink(missing_ok=True)
            _write_files(cdir, {SIDE_FILE: json.dumps(side, indent=2) + "\n"})
            return
        extra_file = self.templates / template / "lxc.conf"
        d = lxcconf.Definition(eid=eid, template=template, kind=tpl["type"], vg=self.vg, bridge=self.bridge,
                               node_id=self.node_id, hostname=hostname, address=address, volumes=tuple(volumes),
                               extra=extra_file.read_text() if extra_file.is_file() else "",
                               memory=memory or lxcconf.MEMORY, pids=pids or lxcconf.PIDS,
                               privileged=bool(tpl.get("privileged")), image_store=bool(tpl.get("image_store")),
                               architecture=arch)
        try:
            text = lxcconf.render(d)
        except (KeyError, ValueError) as e:
            raise Failed(f"{extra_file}: {e}") from None
        Path(lxcconf.LOG_DIR).mkdir(parents=True, exist_ok=True)
        lxcconf.rotated(lxcconf.lxc_log(eid))
        _write_files(cdir, {"config": text, SIDE_FILE: json.dumps(side, indent=2) + "\n"})

    def op_container_undefine(self, eid: int) -> None:
        if self._definition(eid) is None:
            raise Invalid(f"slot {eid} is not defined")
        self._stopped(eid, "undefining it")
        shutil.rmtree(LXC_PATH / contract.container_name(eid))
        shutil.rmtree(kvm.RUN / contract.container_name(eid), ignore_errors=True)

    def _vm(self, d: dict[str, Any]) -> kvm.Vm:
        return kvm.Vm(eid=d["eid"], vg=self.vg, bridge=self.bridge, node_id=self.node_id,
                      memory=d["vm"]["memory"], cpus=d["vm"]["cpus"], volumes=tuple(d["volumes"]),
                      console_log=_console_log(d["eid"]), accel=kvm.accel())

    def _state(self, eid: int) -> dict[str, Any]:
        d = self._definition(eid)
        if d is None:
            return {"eid": eid, "state": "UNDEFINED", "pid": None}
        if d["kind"] == "kvm-system":
            return kvm.state(self._vm(d))
        out = _run(["lxc-info", "-n", contract.container_name(eid), "-H", "-s", "-p"], timeout=30)
        info = _key_values(out)
        pid = info.get("PID")
        return {"eid": eid, "state": info.get("State", "UNKNOWN"), "pid": int(pid) if pid else None}

    def op_container_state(self, eid: int) -> dict[str, Any]:
        return self._state(eid)

    def op_container_list(self) -> list[dict[str, Any]]:
        eids = sorted(int(p.parent.name[4:]) for p in LXC_PATH.glob("slot[0-9]/" + SIDE_FILE))
        return [self._state(eid) for eid in eids]

    def op_container_start(self, eid: int) -> dict[str, Any]:
        d = self._definition(eid)
        if d is None:
            raise Invalid(f"slot {eid} is not defined")
        name = contract.container_name(eid)
        now = self._state(eid)
        if now["state"] == "RUNNING":
            return now
        if d["kind"] == "kvm-system":
            if now["state"] != "STOPPED":  # its disk may still be in use
                raise Invalid(f"slot {eid} is still stopping")
            kvm.start(self._vm(d))
            return self._state(eid)
        self._mount_volumes(eid, d["volumes"], bool(d.get("privileged")))
        if d.get("image_store"):
            self._mount_store(eid)
        if d["kind"] == "lxc-system":
            self._make_targets(eid, d["volumes"])
        _run(["lxc-start", "-n", name], timeout=60)
        _run(["lxc-wait", "-n", name, "-s", "RUNNING", "-t", "30"], timeout=40)
        return self._state(eid)

    def op_container_stop(self, eid: int, timeout: int = 30) -> dict[str, Any]:
        d = self._definition(eid)
        if d is None:
            raise Invalid(f"slot {eid} is not defined")
        if d["kind"] == "kvm-system":  # the ACPI power button within the bound, then a kill
            return kvm.stop(self._vm(d), timeout)
        if self._state(eid)["state"] != "STOPPED":
            # A clean stop (the halt signal) within the bound, then a kill.
            _run(["lxc-stop", "-n", contract.container_name(eid), "-t", str(timeout)], timeout=timeout + 30)
        now = self._state(eid)
        if now["state"] == "STOPPED":
            self._release(eid)
        return now

    def op_container_runtime(self, eid: int) -> dict[str, Any]:
        d = self._definition(eid)
        if d is None:
            raise Invalid(f"slot {eid} is not defined")
        name = contract.container_name(eid)
        vols = {v["volume"]: v for v in self.op_volume_list()}
        d = {"architecture": contract.NODE_ARCHITECTURE, **d}  # a definition from before architectures
        if d["kind"] == "kvm-system":
            vm = self._vm(d)
            rt = kvm.runtime(vm)
            usage = _cgroup_usage(rt["pid"]) if rt["state"] == "RUNNING" and rt["pid"] else {}
            return {**d, **rt, **usage, "ips": [d["address"]] if d.get("address") else [],
                    "veth": None, "bridge": self.bridge, "console_log": vm.console_log,
                    "volumes": [{"volume": contract.volume_name(eid, i),
                                 "device": f"/dev/mapper/{self.vg}-{contract.volume_name(eid, i)}",
                                 "size": vols.get(contract.volume_name(eid, i), {}).get("size"),
                                 "mount": f"/dev/vd{chr(ord('a') + n)} in the VM"}
                                for n, i in enumerate(d["volumes"])]}
        info = _key_values(_run(["lxc-info", "-n", name, "-H"], timeout=30))
        running = info.get("State") == "RUNNING"
        pid = int(info["PID"]) if info.get("PID") else None
        usage = _cgroup_usage(pid) if running and pid else {}
        return {
            **d,
            "state": info.get("State", "UNKNOWN"),
            "pid": pid,
            "ips": _run(["lxc-info", "-n", name, "-i", "-H"], timeout=30).split() if running else [],
            "cpu_seconds": usage.get("cpu_seconds"),
            "memory_bytes": usage.get("memory_bytes"),
            "veth": f"veth{eid}" if info.get("State") == "RUNNING" else None,
            "root_ids": None if d.get("privileged") else contract.slot_ids(eid),
            "bridge": self.bridge,
            "volumes": [{"volume": contract.volume_name(eid, i),
                         "device": f"/dev/mapper/{self.vg}-{contract.volume_name(eid, i)}",
                         "size": vols.get(contract.volume_name(eid, i), {}).get("size"),
                         "mount": "/" if (i == 0 and d["kind"] == "lxc-system")
                         else "/" + contract.volume_target(d["kind"], i)} for i in d["volumes"]],
            "console_log": _console_log(eid),
            **({"receipts": receipts.latest(contract.slot_mount(eid, 0), contract.BOOT_RECEIPTS)}
               if d.get("image_store") and 0 in d["volumes"] else {}),
        }

    def op_container_health(self, eid: int) -> dict[str, Any]:
        """The template's health check, run inside the slot by its /bin/sh (the script is
        given on stdin: an lxc-system slot's root does not hold it)."""
        d = self._definition(eid)
        if d is None:
            raise Invalid(f"slot {eid} is not defined")
        if self._state(eid)["state"] != "RUNNING":
            return {"ok": False, "output": "not running"}
        script = (self.templates / d["template"] / "health").read_bytes()
        if d["kind"] == "kvm-system":  # on the node, with what it needs to reach the VM
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SLOT_EID": str(eid),
                   "SLOT_ADDRESS": d.get("address") or "", "SLOT_HOSTNAME": d.get("hostname") or "",
                   "SLOT_CONSOLE_LOG": _console_log(eid)}
            return _health(["/bin/sh", "-s"], script, env)
        # No log: lxc-attach complains of a key LXC 5 no longer has, at every check.
        return _health(["lxc-attach", "-n", contract.container_name(eid), "--clear-env", "--logpriority=FATAL",
                        "--logfile=/dev/null", "--", "/bin/sh", "-s"], script)

    def trim_logs(self, every: float = LOG_CHECK) -> None:
        """Forever, every EVERY seconds: trim_logs_once."""
        while True:
            time.sleep(every)
            self.trim_logs_once()

    def trim_logs_once(self) -> None:
        """The logs that grow while a slot runs (a VM's console, LXC's own log) kept within
        their bound. LXC bounds an lxc slot's console itself."""
        for side in LXC_PATH.glob("slot[0-9]/" + SIDE_FILE):
            eid = int(side.parent.name.removeprefix("slot"))
            vm = (self._definition(eid) or {}).get("kind") == "kvm-system"
            path = lxcconf.console_log(eid) if vm else lxcconf.lxc_log(eid)
            try:
                if lxcconf.trimmed(path, lxcconf.LOG_MAX):
                    log.info("%s: past %d bytes, moved to %s.1", path, lxcconf.LOG_MAX, path.name)
            except OSError as e:
                log.warning("%s: not trimmed: %s", path, e)


def _directory(root: Path, parts: list[str], where: str) -> int:
    """A descriptor of ROOT/PARTS, each directory on the way made if missing and opened
    without following a symbolic link: a link planted in a volume cannot lead out of it."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                raise Invalid(f"{where}: '{part}' is not a directory of the volume") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _console_log(eid: int) -> str:
    return str(lxcconf.console_log(eid))


def _replace(dir_fd: int, name: str, data: bytes, where: str) -> None:
    """NAME in the directory DIR_FD holds DATA (files.replace): refused (Invalid) unless NAME
    is absent or a regular file."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise Invalid(f"{where}: not a plain file of the volume")
    try:
        files.replace(dir_fd, name, data)
    except OSError:
        raise Invalid(f"{where}: cannot write beside it") from None


def _write_files(cdir: Path, files: dict[str, str]) -> None:
    """Each file written whole, then renamed into place."""
    cdir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        with tempfile.NamedTemporaryFile("w", dir=cdir, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, cdir / name)


def _health(argv: list[str], script: bytes, env: dict[str, str] | None = None) -> dict[str, Any]:
    """A template's health script given on stdin to ARGV (a shell), within the bound."""
    try:
        proc = subprocess.run(argv, input=script, capture_output=True, env=env, timeout=HEALTH_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "output": f"health check gave no answer within {HEALTH_TIMEOUT} s"}
    text = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    return {"ok": proc.returncode == 0, "output": text.splitlines()[-1] if text else ""}


def _cgroup_usage(pid: int) -> dict[str, float]:
    """CPU time and memory of a container, from its cgroup (v2): what lxc-info leaves out."""
    try:
        rel = Path(f"/proc/{pid}/cgroup").read_text().strip().split("::", 1)[1]
        cg = Path("/sys/fs/cgroup") / rel.lstrip("/")
        stat = dict(line.split() for line in (cg / "cpu.stat").read_text().splitlines())
        return {"cpu_seconds": int(stat["usage_usec"]) / 1e6, "memory_bytes": int((cg / "memory.current").read_text())}
    except (OSError, IndexError, KeyError, ValueError):
        return {}


def _has_signature(dev: str) -> bool:
    """Does the device hold a file system (or any signature blkid knows)? Exit status 2: none."""
    proc = subprocess.run(["blkid", "-p", dev], capture_output=True, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode not in (0, 2):
        raise Failed(f"blkid {dev}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.returncode == 0


def _pairs(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.append((key.strip(), value.strip()))
    return out


def _key_values(text: str) -> dict[str, str]:
    return dict(_pairs(text))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    executor = Executor(contract.node_config(), contract.catalogue())
    log.info("CB-Executor: node %s, volume group %s, bridge %s, %d templates; socket %s",
             executor.node_id, executor.vg, executor.bridge, len(executor.catalogue), contract.EXECUTOR_SOCKET)
    threading.Thread(target=executor.trim_logs, name="logs", daemon=True).start()
    wire.serve(contract.EXECUTOR_SOCKET, executor.handle, ready=wire.notify_ready)
    return 0

