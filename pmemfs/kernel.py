"""Python API for kernel objects on a mounted pmemfs (through its control channel).

    from pmemfs.kernel import KernelObjects
    k = KernelObjects("/mnt/pmem")
    obj = k.create("iommu-root", "iommu-page-table", 4096)
    obj["phys_offset"]            # region offset: program the "device" with it
    k.preserve("iommu-root"); k.freeze()
    ... kexec (kill -9 the daemon, mount again) ...
    k.retrieve("iommu-root"); k.finish()

Every call is root's. Errors are OSError with the errno the filesystem returned
(EBUSY: frozen or pinned; EIO: checksum mismatch after the restart; ENOSPC: no
contiguous run that large).
"""

from __future__ import annotations

import errno
import json
import os

from .serve.control import EXTENTS, KERNEL

TYPES = ("generic", "iommu-page-table", "dma-buffer", "device-state", "clock-calibration")


class KernelObjects:
    def __init__(self, mountpoint: str):
        self.mountpoint = mountpoint

    def _set(self, verb: str, value: str = "") -> None:
        os.setxattr(self.mountpoint, KERNEL + b"." + verb.encode(), value.encode(errors="surrogateescape"))

    def path(self, name: str) -> str:
        return os.path.join(self.mountpoint, ".kernel", name)

    def create(self, name: str, type: str, size: int, version: int = 1) -> dict:
        self._set("create", json.dumps({"name": name, "type": type, "size": size, "version": version}))
        return self.show(name)

    def show(self, name: str) -> dict:
        return json.loads(os.getxattr(self.path(name), KERNEL))

    def list(self) -> list[dict]:
        """Every object, in name order. One request (refused, ENODATA, to a caller
        without CAP_SYS_ADMIN, as any trusted.* query); object by object when there
        are too many for one xattr value (E2BIG)."""
        try:
            return json.loads(os.getxattr(self.mountpoint, KERNEL + b".list"))
        except OSError as e:
            if e.errno != errno.E2BIG:
                raise
        ns = os.path.join(self.mountpoint, ".kernel")
        return [self.show(name) for name in sorted(os.listdir(ns))]

    def preserve(self, name: str) -> None:
        self._set("preserve", name)

    def unpreserve(self, name: str) -> None:
        self._set("unpreserve", name)

    def freeze(self) -> None:
        self._set("freeze")

    def unfreeze(self) -> None:
        self._set("unfreeze")

    def retrieve(self, name: str) -> dict:
        self._set("retrieve", name)
        return self.show(name)

    def finish(self, reclaim: bool = False) -> list[str]:
        """End the cycle; returns the objects nobody retrieved (freed with reclaim)."""
        unclaimed = [o["name"] for o in self.list() if o["state"] in ("restored", "damaged")]
        self._set("finish", "reclaim" if reclaim else "")
        return unclaimed

    def remove(self, name: str) -> None:
        self._set("rm", name)


def extents(path: str) -> list[tuple[int, int, int]]:
    """(file offset, region offset, length) of each extent of a file on pmemfs."""
    return [tuple(e) for e in json.loads(os.getxattr(path, EXTENTS))]
