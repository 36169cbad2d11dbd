"""From mkosi's root tree to the firmware: root.img, a squashfs image with its dm-verity
hash tree, which a node's LV holds as it is and mounts read-only.

The tree is finished here for a read-only root: /var moves to /usr/share/factory/var and
is copied into the writable /var at boot; /boot holds this copy's own kernel and initrd."""

from __future__ import annotations

import hashlib
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

from cbios.errors import StepError
from cbios.node.boot import verity
from cbios.profile import Profile
from cbios.run import complete_step, run

# xz, not zstd: GRUB 2.06 reads the kernel and initrd out of the image, and its squashfs
# reader knows xz (and gzip, lzo), not zstd. No BCJ filter: mksquashfs tries a block with
# and without it, which takes 2.7 times as long for 2.6% less.
# 128 KiB blocks: the kernel decompresses a whole block (a fragment block holds many small
# files) for a read of any page of it, and keeps only three fragment blocks; with 1 MiB
# blocks a boot decompressed its files many times over (reading a boot's files: 8.9 s with
# 128 KiB blocks, 46 s with 1 MiB, on this machine) for 6% less size.
SQUASHFS = ["-comp", "xz", "-b", "128K"]
FACTORY_VAR = "usr/share/factory/var"
PYTHON_LIB = "usr/lib/python3*"  # the standard library (python3.X) and Debian's modules (python3)
TMPFILES = "usr/lib/tmpfiles.d/cbios-factory-var.conf"
# What in /var describes the firmware rather than the node: linked to the running copy's own,
# not copied (a copy made by an older firmware would outlive its update, and dpkg's 1000
# files took seconds of each boot to copy under TCG).
FIRMWARE_VAR = ("lib/dpkg", "cache/debconf")


def finish_tree(tree: Path, profile: Profile, vmlinuz: Path, initrd: Path) -> None:
    """Make the tree what a node mounts read-only as /."""
    boot = tree / "boot"
    shutil.rmtree(boot, ignore_errors=True)
    boot.mkdir()
    shutil.copy2(vmlinuz, boot / "vmlinuz")
    shutil.copy2(initrd, boot / "initrd.img")
    _var_to_factory(tree)
    _authorized_keys(tree, profile)
    unchecked_bytecode(tree)
    # Empty, not "uninitialized": a read-only root would otherwise be a first boot every time
    # (systemd then applies every unit preset, 11 s under TCG). The machine ID is made anew
    # at each boot either way.
    (tree / "etc/machine-id").unlink(missing_ok=True)
    (tree / "etc/machine-id").write_text("")


def unchecked_bytecode(tree: Path) -> int:
    """Compile again, with unchecked hashes, every module of the tree's Python that Debian
    compiled; return how many. Its bytecode has checked hashes (py_compile's default when
    SOURCE_DATE_EPOCH is set, as in this build), so each import read the module's source as
    well, to hash it: cold reads of the squashfs at every boot, for a source that cannot
    change under its bytecode on a read-only root. Bytecode of another Python than this one
    is left as it is."""
    compiled = sorted(tree.glob(f"{PYTHON_LIB}/**/__pycache__/*.{sys.implementation.cache_tag}.pyc"))
    if not compiled:
        return 0
    count = 0
    with complete_step(f"Compiling {len(compiled)} Python modules again, with unchecked hashes"):
        for pyc in compiled:
            source = pyc.parent.parent / f"{pyc.name.split('.', 1)[0]}.py"
            if source.is_file():  # else orphaned bytecode, which nothing imports
                py_compile.compile(str(source), cfile=str(pyc), dfile=f"/{source.relative_to(tree)}", doraise=True,
                                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
                count += 1
    return count


def _var_to_factory(tree: Path) -> None:
    var, factory = tree / "var", tree / FACTORY_VAR
    if factory.exists():
        shutil.rmtree(factory)
    factory.parent.mkdir(parents=True, exist_ok=True)
    os.rename(var, factory)
    var.mkdir(mode=0o755)
    lines = ["# /var is writable and starts empty: fill it from the image at boot (cbios).",
             "# 'C' copies only where the target is missing, so a persistent /var keeps its data;",
             "# it works a level down because other tmpfiles.d lines create /var/lib and the like.",
             "# 'L+': the package database is the running copy's, whichever copy runs."]
    for top in sorted(factory.iterdir()):
        if top.is_dir() and not top.is_symlink():
            lines.append(f"d /var/{top.name} {top.stat().st_mode & 0o7777:04o} root root -")
            entries = sorted(top.iterdir())
        else:
            entries = [top]
        for entry in entries:
            rel = entry.relative_to(factory)
            kind = "L+" if rel.as_posix() in FIRMWARE_VAR else "C"
            lines.append(f"{kind} /var/{rel} - - - - /{FACTORY_VAR}/{rel}")
    (tree / TMPFILES).parent.mkdir(parents=True, exist_ok=True)
    (tree / TMPFILES).write_text("\n".join(lines) + "\n")


def _authorized_keys(tree: Path, profile: Profile) -> None:
    for user in profile.users:
        if not user.ssh_keys:
            continue
        home = tree / "root" if user.name == "root" else tree / "home" / user.name
        ssh = home / ".ssh"
        ssh.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(ssh, 0o700)
        keys = ssh / "authorized_keys"
        keys.write_text("".join(k.strip() + "\n" for k in user.ssh_keys))
        os.chmod(keys, 0o600)


INITRD_XZ = ["--check=crc32", "--lzma2=preset=9e,dict=32MiB"]
INITRD_CACHE_KEEP = 4  # packed initrds kept in the cache: a release and the few before it


def recompress_initrd(initrd: Path, parts: list[Path], out: Path, cache: Path) -> None:
    """OUT: INITRD (mkosi's zstd cpio archives PARTS, each zero-padded) as one xz stream.

    GRUB reads the initrd out of the copy's squashfs, which stores a block that xz cannot
    shrink as it is; GRUB's sha256 check reads such a file fast, but a block squashfs did
    compress again for every small read. xz also makes the initrd smaller than zstd -19 does,
    and the kernel unpacks it (CRC32 check, no BCJ filter: what its decoder takes).

    The archive is made reproducible (inode numbers in order, every mtime 0), so an initrd
    whose files did not change, in whichever checkout or release, is packed once: xz takes
    about 90 s, and the packed initrd is kept in CACHE under the hash of what it holds."""
    data = initrd.read_bytes()
    cpio = b""
    for part in parts:
        packed = part.read_bytes()
        if not data.startswith(packed):
            raise StepError("initrd", f"{initrd} does not hold {part} where expected")
        cpio += _zstd_d(packed)
        data = data[len(packed):].lstrip(b"\0")
    if data:
        cpio += _zstd_d(data)  # mkosi's cpio of the kernel modules, padded with zeros
    cpio = reproducible_cpio(cpio)
    cached = cache / f"{hashlib.sha256(cpio + repr(INITRD_XZ).encode()).hexdigest()}.xz"
    if cached.is_file():
        shutil.copyfile(cached, out)
        os.utime(cached)  # the newest are kept
        return
    with complete_step(f"Compressing {out.name} with xz ({len(cpio) >> 20} MiB of cpio)"):
        proc = subprocess.run(["xz", "-c", "-T1", *INITRD_XZ], input=cpio, capture_output=True, check=False)
    if proc.returncode != 0:
        raise StepError("initrd", f"xz failed: {proc.stderr.decode(errors='replace').strip()}")
    out.write_bytes(proc.stdout)
    cache.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial")
    partial.write_bytes(proc.stdout)
    partial.replace(cached)
    for old in sorted(cache.glob("*.xz"), key=lambda f: f.stat().st_mtime, reverse=True)[INITRD_CACHE_KEEP:]:
        old.unlink(missing_ok=True)


CPIO_HEADER = 110


def _align4(n: int) -> int:
    return (n + 3) & ~3


def reproducible_cpio(data: bytes, mtime: int = 0) -> bytes:
    """DATA, concatenated newc cpio archives (perhaps zero-padded between them), with inode
    numbers given in order of first use (hard links stay linked) and every mtime MTIME."""
    out = bytearray()
    inodes: dict[int, int] = {}
    i = 0
    while i < len(data):
        if data[i] == 0:  # padding between archives
            out.append(0)
            i += 1
            continue
        header = bytearray(data[i:i + CPIO_HEADER])
        if bytes(header[:6]) not in (b"070701", b"070702"):
            raise StepError("initrd", f"not a newc cpio archive at byte {i}")
        namesize, filesize = int(header[94:102], 16), int(header[54:62], 16)
        header[6:14] = b"%08X" % inodes.setdefault(int(header[6:14], 16), len(inodes) + 1)
        header[46:54] = b"%08X" % mtime
        end = _align4(_align4(i + CPIO_HEADER + namesize) + filesize)
        out += header + data[i + CPIO_HEADER:end]
        i = end
    return bytes(out)


def _zstd_d(data: bytes) -> bytes:
    """DATA unpacked: zstd frames, then perhaps zeros (the padding between cpio archives,
    which the kernel skips and zstd does not: the shortest zero tail that unpacks is it)."""
    error = ""
    for end in range(len(data), max(len(data.rstrip(b"\0")), len(data) - 4096) - 1, -1):
        proc = subprocess.run(["zstd", "-dcq"], input=data[:end], capture_output=True, check=False)
        if proc.returncode == 0:
            return proc.stdout
        error = error or proc.stderr.decode(errors="replace").strip()
    raise StepError("initrd", f"zstd cannot unpack it: {error}")


def tree_size(tree: Path) -> int:
    """Bytes the tree occupies (allocated blocks, each inode at least one block)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += max(st.st_blocks * 512, 4096)
    return total


def make_squashfs(tree: Path, out: Path, log_file: Path, source_date_epoch: int | None) -> None:
    out.unlink(missing_ok=True)
    env = {"SOURCE_DATE_EPOCH": str(source_date_epoch)} if source_date_epoch is not None else None
    with complete_step(f"Making {out.name} (squashfs, contents {tree_size(tree) >> 20} MiB)"):
        run(["mksquashfs", tree, out, "-noappend", "-quiet", "-no-progress", *SQUASHFS],
            step="mksquashfs", env=env, log_file=log_file)


def make_root_img(tree: Path, out: Path, log_file: Path, source_date_epoch: int | None) -> verity.Verity:
    """root.img: TREE as squashfs, padded to whole blocks, then its dm-verity hash tree."""
    make_squashfs(tree, out, log_file, source_date_epoch)
    blocks = -(-out.stat().st_size // verity.BLOCK)
    os.truncate(out, blocks * verity.BLOCK)
    with complete_step(f"Appending the dm-verity hash tree of {blocks} blocks"):
        proc = run(verity.format_cmd(out, blocks), step="veritysetup", capture=True)
    return verity.Verity(root_hash=verity.root_hash_of(proc.stdout), data_blocks=blocks)


def ext4_size(tree: Path, headroom: int) -> int:
    """Bytes an ext4 file system needs for TREE plus HEADROOM, in whole MiB."""
    used = tree_size(tree)
    # ext4 metadata (inode tables, journal) takes about 10% of a small file system.
    size = used + used // 10 + headroom + (16 << 20)
    return (size + (1 << 20) - 1) // (1 << 20) << 20
