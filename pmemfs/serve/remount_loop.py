"""The fallback supervisor, where a connection cannot be handed over (no takeover here,
or live=off): when the daemon dies, clear the dead mount and mount afresh with a new
`--single` daemon. Clients see ENOTCONN in between.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable

from .mountctl import REMOUNTABLE

log = logging.getLogger("pmemfs.supervisor")


def remount_on_death(region: str, mountpoint: str, options: set[str], single_cmd: list[str],
                     ready: Callable[[str], None]) -> int:
    """The fallback supervisor: when the daemon dies, clear the dead mount and mount
    again with a new one. Clients see ENOTCONN in between."""
    from .mounting import kernel_options_at, prepare_mountpoint

    first = True
    real = os.path.realpath(mountpoint)
    while True:
        r, w = os.pipe()
        cmd = [*single_cmd]
        cmd[cmd.index("--options") + 1] = ",".join(sorted(options))
        proc = subprocess.Popen([*cmd, "--ready-fd", str(w)], pass_fds=(w,), cwd="/",
                                stdin=subprocess.DEVNULL)
        os.close(w)
        with os.fdopen(r) as f:
            line = f.readline().strip()
        if first:
            ready(line or "error the daemon exited without a word")
            first = False
        if not line.startswith("ok"):
            proc.wait()
            return 1
        code = proc.wait()
        if code >= 0:
            log.info("daemon %d exited with %d: supervisor done", proc.pid, code)
            return code
        log.warning("daemon %d died (signal %d): remounting", proc.pid, -code)
        now = kernel_options_at(real)  # the dead mount's flags: a remount may have changed them
        if now is not None:
            options = (options - REMOUNTABLE) | now
        try:
            prepare_mountpoint(region, mountpoint, force=True)
        except Exception as e:
            log.error("cannot clear %s for a new daemon: %s", mountpoint, e)
            return 1
