"""The guest of examples/_vm.py: its kernel (from /boot) and its initramfs (vm_guest.c,
compiled static, as /init, with the kernel's virtio-balloon modules), and what a machine
needs to run it.
"""

from __future__ import annotations

import glob
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST_SOURCE = os.path.join(HERE, "vm_guest.c")
QEMU = "qemu-system-x86_64"


class VMError(Exception):
    """Something about the VM did not hold; one line for a person."""


# ------------------------------------------------------------------ what it needs
def find_kernel() -> str | None:
    """$PMEMFS_VM_KERNEL, else the newest /boot/vmlinuz-* (linux-image-amd64 puts one there)."""
    if os.environ.get("PMEMFS_VM_KERNEL"):
        return os.environ["PMEMFS_VM_KERNEL"]

    def version(path: str) -> list:
        return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", path)]

    found = sorted(glob.glob("/boot/vmlinuz-*"), key=version)
    return found[-1] if found else None


def missing() -> list[str]:
    """What the VM flows need and this machine lacks (./run demo-vm and ./run test install them)."""
    out = []
    if not shutil.which(QEMU):
        out.append(f"{QEMU} (Debian package qemu-system-x86)")
    if not find_kernel():
        out.append("a kernel in /boot/vmlinuz-* (Debian package linux-image-amd64)")
    if not shutil.which("gcc") or not os.path.exists("/usr/lib/x86_64-linux-gnu/libc.a"):
        out.append("gcc and a static libc (Debian packages gcc, libc6-dev)")
    return out


# ------------------------------------------------------------------ the guest image
def _cpio_entry(name: str, mode: int, ino: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One member of a newc ("070701") cpio archive, the format the kernel unpacks."""
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = ("070701" + "".join(f"{x:08x}" for x in fields)).encode() + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


BALLOON_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
                   "virtio_balloon")  # what vm_guest.c loads, in order


def guest_modules(kernel: str) -> dict[str, bytes]:
    """The virtio-balloon modules of the guest kernel (vmlinuz-VERSION -> /lib/modules/VERSION),
    uncompressed; {} when the host does not have them (the guest then has no balloon)."""
    version = os.path.basename(kernel).removeprefix("vmlinuz-")
    found = {}
    for name in BALLOON_MODULES:
        for path in glob.glob(f"/lib/modules/{version}/kernel/drivers/virtio/{name}.ko*"):
            with open(path, "rb") as f:
                data = f.read()
            if path.endswith(".xz"):
                data = lzma.decompress(data)
            elif path.endswith(".zst"):
                continue  # no zstd in the standard library: no balloon then
            found[name] = data
    return found if len(found) == len(BALLOON_MODULES) else {}


def build_initramfs(cache_dir: str | None = None, kernel: str = "") -> str:
    """Compile vm_guest.c statically and pack it as /init, with the guest kernel's
    virtio-balloon modules when there are any; cached by the contents' hash."""
    with open(GUEST_SOURCE, "rb") as f:
        source = f.read()
    modules = guest_modules(kernel) if kernel else {}
    h = hashlib.sha256(source)
    for name in sorted(modules):
        h.update(name.encode() + hashlib.sha256(modules[name]).digest())
    digest = h.hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "pmemfs-vm-guest")
    out = os.path.join(cache_dir, f"initramfs-{digest}.cpio")
    if os.path.exists(out):
        return out
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        binary = os.path.join(tmp, "init")
        r = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-s", "-o", binary, GUEST_SOURCE],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise VMError(f"cannot compile the guest program: {r.stderr.strip()[-500:]}")
        with open(binary, "rb") as f:
            init = f.read()
        # /dev/console must exist for the kernel to give init its stdin/out/err.
        entries = [_cpio_entry("dev", 0o040755, 1), _cpio_entry("dev/console", 0o020600, 2, rdev=(5, 1)),
                   _cpio_entry("init", 0o100755, 3, init)]
        if modules:
            entries += [_cpio_entry("lib", 0o040755, 4), _cpio_entry("lib/modules", 0o040755, 5)]
            entries += [_cpio_entry(f"lib/modules/{name}.ko", 0o100644, 6 + i, modules[name])
                        for i, name in enumerate(BALLOON_MODULES)]
        archive = b"".join(entries) + _cpio_entry("TRAILER!!!", 0, 0)
        part = os.path.join(tmp, "initramfs.cpio")
        with open(part, "wb") as f:
            f.write(archive)
        os.replace(part, out)  # atomic: two builders at once both end with a whole file
    return out
