"""What every serving process (the supervisor and each daemon) sets up for itself: its
log, the pipe `pmemfs mount` waits on, the arguments it is started with, its
oom_score_adj; and the one line an error becomes. Standard library only.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

# The supervisor's logger, as before this moved here: a daemon's oom_score_adj warning
# has always been a pmemfs.supervisor line.
log = logging.getLogger("pmemfs.supervisor")

# Memory pressure the mount did not cause must not end it (docs/DESIGN.md, "The
# backing"): killing the daemon frees none of the region, whose pages count in its
# RSS. The supervisor, which holds the connection, is never chosen; the daemon and its
# standby only when nothing else is left. Only root (CAP_SYS_RESOURCE) may lower these.
OOM_SCORE_ADJ_SUPERVISOR = -1000
OOM_SCORE_ADJ_DAEMON = -900


def set_oom_score_adj(value: int, who: str = "this process") -> bool:
    """Set this process's oom_score_adj; False, and a line in the log, when it may not
    (lowering it needs CAP_SYS_RESOURCE): it then keeps the value it inherited."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
        return True
    except OSError as e:
        log.warning("cannot set oom_score_adj to %d (%s; lowering it needs CAP_SYS_RESOURCE): "
                    "the OOM killer may choose %s", value, e.strerror, who)
        return False


def setup_logging(log_file: str | None, debug: bool) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def ready_pipe(fd: int | None) -> Callable[[str], None]:
    """Report "ok ..." or "error ..." once on the pipe `pmemfs mount` waits on."""
    def ready(msg: str) -> None:
        if fd is not None:
            try:
                os.write(fd, (msg + "\n").encode())
                os.close(fd)
            except OSError:
                pass

    return ready


def arguments(prog: str):
    """The arguments `pmemfs mount` passes to the supervisor and to a daemon alike."""
    import argparse

    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("region")
    p.add_argument("mountpoint")
    p.add_argument("--options", default="")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--log")
    p.add_argument("--debug", action="store_true")
    return p
