"""What every filesystem operation speaks: the caller (Ctx) and the failure (FsError).

Below the engine so that the modules the engine uses (packing, kernel objects) can
raise and take these without importing the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import creds
from .creds import Creds


class FsError(Exception):
    """An operation failed with an errno, as tmpfs would fail it."""

    def __init__(self, err: int, message: str = ""):
        super().__init__(message or os.strerror(err))
        self.errno = err


@dataclass(frozen=True)
class Ctx:
    uid: int = 0
    gid: int = 0
    pid: int = 0
    creds: Creds | None = None  # None: read the caller's groups and capabilities from /proc
    umask: int = 0  # applied to a new inode's mode unless its directory has a default ACL


ROOT_CTX = Ctx(creds=creds.ROOT)  # the daemon's own work, and engine callers that are root
