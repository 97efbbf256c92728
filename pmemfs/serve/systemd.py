"""systemd integration: the pmemfs@.service template, its per-instance files, sd_notify
and the file-descriptor store.

`pmemfs systemd-unit` prints the unit (with this installation's absolute paths) or
installs it; an instance name maps to /etc/pmemfs/NAME.conf, which names the region
and the mountpoint. The service runs `pmemfs mount -f`, which tells systemd it is
ready (sd_notify READY=1) once the mount is set up, so units ordered after it start
only then, and unmounts cleanly on SIGTERM at stop.

`systemctl restart` is a live update: the supervisor keeps the FUSE descriptor and
what a successor needs (the kernel's FUSE_INIT) in systemd's fd store. At SIGTERM it
asks the manager whether a restart is under way; if so it hands the daemon over and
exits without unmounting, and the next supervisor takes the connection from the store
(docs/DESIGN.md, "Restarting under systemd").
"""

from __future__ import annotations

import array
import json
import os
import re
import shutil
import socket
import subprocess
import sys

UNIT_NAME = "pmemfs@.service"
UNIT_DIR = "etc/systemd/system"
CONF_DIR = "etc/pmemfs"

UNIT_TEMPLATE = """\
# pmemfs@.service: one pmemfs mount per instance (written by `pmemfs systemd-unit`).
#
# Instance NAME reads /etc/pmemfs/NAME.conf (`pmemfs systemd-unit --install --instance NAME
# --region ... --mountpoint ...` writes it):
#   REGION=/dev/shm/vm.region    the region (made by pmemfs-mkfs)
#   MOUNTPOINT=/srv/pmem/vm      made if missing
#   OPTIONS=allow_other          optional: what `pmemfs mount -o` takes
#   CREATE_SIZE=64G              optional: make the region at start if it is missing
#                                (a region in /dev/shm does not outlive a cold boot)
#
# A VM whose RAM is on the mount orders itself after the instance and requires it:
#   [Unit]
#   Requires=pmemfs@vm.service
#   After=pmemfs@vm.service
# It then starts once the mount is up and is stopped before the daemon is.
#
# ExecStart runs pmemfs's supervisor in the foreground: it holds the FUSE connection, so a
# daemon that crashes is replaced under running guests without systemd noticing, and
# `systemctl reload pmemfs@NAME` (SIGHUP) is a live upgrade of the daemon to the installed
# code: the guests only pause. `systemctl restart pmemfs@NAME` is live too, and replaces the
# supervisor as well: the FUSE descriptor waits in systemd's fd store meanwhile, the mount
# stays, and the guests only pause (Requires= restarts the VM units with it: say
# `systemctl restart --job-mode=ignore-dependencies pmemfs@NAME` to leave them running).
# A supervisor that dies is replaced the same way (Restart=on-failure).
# `systemctl stop` unmounts: the VMs that require the instance are stopped first.

[Unit]
Description=pmemfs %i (persistent-memory filesystem)
After=local-fs.target systemd-modules-load.service
Before=libvirtd.service virtqemud.service libvirt-guests.service
AssertPathExists=@CONF@/%i.conf

[Service]
Type=notify
NotifyAccess=main
Environment=OPTIONS= CREATE_SIZE= PMEMFS_UNIT=%n
EnvironmentFile=@CONF@/%i.conf
ExecStartPre=/bin/sh -c '[ -e "$$REGION" ] || [ -z "$$CREATE_SIZE" ] || exec @MKFS@ --size "$$CREATE_SIZE" "$$REGION"'
# -f makes the mountpoint if missing (never stats it: while a restart is under way it is
# a mount that nobody serves yet, and a stat would wait for the daemon this starts).
ExecStart=@PMEMFS@ mount -f -o ${OPTIONS} ${REGION} ${MOUNTPOINT}
ExecReload=/bin/kill -HUP $MAINPID
# The FUSE descriptor and the saved FUSE_INIT, kept across restarts (not across stop).
FileDescriptorStoreMax=2
# SIGTERM: at stop the supervisor unmounts, its daemon marks the region clean, both exit;
# at restart the daemon drains and the mount stays for the next supervisor.
KillMode=mixed
TimeoutStopSec=120
Restart=on-failure
# The daemon holds the guests' memory: the OOM killer should pick anything else first
# (the supervisor, which holds the connection, lowers itself to -1000 at start).
OOMScoreAdjust=-900

[Install]
WantedBy=multi-user.target
"""

_INSTANCE = re.compile(r"[A-Za-z0-9_.:-]+")
_PLAIN = re.compile(r"[^\s'\"\\$`]+")  # a value EnvironmentFile and the shell take as is


class UnitError(Exception):
    """A bad instance definition; one line for a person."""


def executable(name: str) -> str:
    """Absolute path of one of our commands: beside this Python first (a venv), else PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(here, os.X_OK):
        return here
    found = shutil.which(name)
    if not found:
        raise UnitError(f"cannot find the {name} command to put in the unit")
    return os.path.abspath(found)


def unit_text(conf_dir: str = "/" + CONF_DIR) -> str:
    return (UNIT_TEMPLATE.replace("@PMEMFS@", executable("pmemfs")).replace("@MKFS@", executable("pmemfs-mkfs"))
            .replace("@CONF@", conf_dir))


def conf_text(region: str, mountpoint: str, options: str = "", create_size: str = "") -> str:
    lines = []
    for key, value, required in (("REGION", region, True), ("MOUNTPOINT", mountpoint, True),
                                 ("OPTIONS", options, False), ("CREATE_SIZE", create_size, False)):
        if not value:
            if required:
                raise UnitError(f"{key.lower()} is required")
            continue
        if not _PLAIN.fullmatch(value):
            raise UnitError(f"{key.lower()} {value!r}: no spaces, quotes, backslashes or $ here")
        if key in ("REGION", "MOUNTPOINT") and not os.path.isabs(value):
            raise UnitError(f"{key.lower()} {value!r} must be an absolute path")
        lines.append(f"{key}={value}")
    return "# pmemfs@ instance (pmemfs systemd-unit)\n" + "\n".join(lines) + "\n"


def check_instance(name: str) -> None:
    if not _INSTANCE.fullmatch(name):
        raise UnitError(f"instance name {name!r}: use letters, digits, '_', '.', ':' or '-'")


def install(root: str = "/", instance: str | None = None, conf: str | None = None) -> list[str]:
    """Write the unit (and an instance's conf) under root; returns the files written."""
    written = []
    unit_dir = os.path.join(root, UNIT_DIR)
    os.makedirs(unit_dir, exist_ok=True)
    path = os.path.join(unit_dir, UNIT_NAME)
    _write(path, unit_text(), 0o644)
    written.append(path)
    if instance is not None and conf is not None:
        check_instance(instance)
        conf_dir = os.path.join(root, CONF_DIR)
        os.makedirs(conf_dir, exist_ok=True)
        path = os.path.join(conf_dir, f"{instance}.conf")
        _write(path, conf, 0o644)
        written.append(path)
    return written


def _write(path: str, text: str, mode: int) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def notify(state: str, fds: tuple[int, ...] = ()) -> bool:
    """sd_notify(3): send state (e.g. "READY=1") to $NOTIFY_SOCKET; False when not under systemd.

    fds go along as SCM_RIGHTS (FDSTORE=1 uses that).
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        s.sendmsg([state.encode()], anc)
    return True


# ------------------------------------------------------------ the fd store
FUSE_FD_NAME = "pmemfs-fuse"  # the /dev/fuse descriptor of the mount
STATE_FD_NAME = "pmemfs-state"  # a memfd: JSON of what a successor needs (the FUSE_INIT bytes)


def under_systemd() -> bool:
    """Run by a unit that keeps our descriptors (PMEMFS_UNIT names it) and listens."""
    return bool(os.environ.get("PMEMFS_UNIT") and os.environ.get("NOTIFY_SOCKET"))


def inherited_fds() -> dict[str, int]:
    """The descriptors systemd passed us (sd_listen_fds_with_names), by name; the
    environment variables are removed so that no child takes them for its own."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    fds = {}
    for i in range(count):
        fd = 3 + i  # SD_LISTEN_FDS_START
        os.set_inheritable(fd, False)
        fds[names[i] if i < len(names) and names[i] else f"fd{i}"] = fd
    return fds


def store_fd(name: str, fd: int) -> bool:
    return notify(f"FDSTORE=1\nFDNAME={name}", (fd,))


def forget_fd(name: str) -> bool:
    return notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def state_memfd(state: dict) -> int:
    fd = os.memfd_create(STATE_FD_NAME, os.MFD_CLOEXEC)
    os.write(fd, json.dumps(state).encode())
    return fd


def read_state(fd: int) -> dict:
    """What a predecessor stored; {} when it is not ours or not readable."""
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
        state = json.loads(data)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and state.get("format") == 1 else {}


def restart_pending(unit: str, stored: int) -> bool:
    """Is the manager restarting `unit` right now (a restart job, not a stop), with our
    `stored` descriptors in its fd store to hand to the next supervisor?

    At SIGTERM a supervisor cannot tell a stop from a restart; the manager's job list
    can. It is asked through systemctl (of the user manager when MANAGERPID says we run
    under one). The store is checked too: systemd drops what a unit without
    FileDescriptorStoreMax= sends, without a word. When the manager cannot be asked,
    the answer is no: the safe side is a clean unmount.
    """
    base = ["systemctl", *(["--user"] if os.environ.get("MANAGERPID") else []), "--no-pager"]
    try:
        jobs = subprocess.run([*base, "list-jobs", "--no-legend", "--plain"], capture_output=True,
                              text=True, timeout=10).stdout
        kept = subprocess.run([*base, "show", "-p", "NFileDescriptorStore", "--value", unit],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return False
    if not kept.isdigit() or int(kept) < stored:
        return False
    for line in jobs.splitlines():
        words = line.split()
        if len(words) >= 3 and words[1] == unit and words[2] in RESTART_JOBS:
            return True
    return False


RESTART_JOBS = {"restart", "try-restart", "reload-or-restart", "try-reload-or-restart"}
