"""systemd integration: the pmemfs@.service template, its per-instance files, sd_notify.

`pmemfs systemd-unit` prints the unit (with this installation's absolute paths) or
installs it; an instance name maps to /etc/pmemfs/NAME.conf, which names the region
and the mountpoint. The service runs `pmemfs mount -f`, which tells systemd it is
ready (sd_notify READY=1) once the mount is set up, so units ordered after it start
only then, and unmounts cleanly on SIGTERM at stop.
"""

from __future__ import annotations

import array
import os
import re
import shutil
import socket
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
# `systemctl reload pmemfs@NAME` (SIGHUP) is a live upgrade to the installed code: the
# guests only pause. `systemctl restart` is a stop and a start (an unmount): the VMs that
# require the instance are stopped first. Keeping the descriptor in systemd's fd store,
# so that restart too could be live, is not built.

[Unit]
Description=pmemfs %i (persistent-memory filesystem)
After=local-fs.target systemd-modules-load.service
Before=libvirtd.service virtqemud.service libvirt-guests.service
AssertPathExists=/etc/pmemfs/%i.conf

[Service]
Type=notify
NotifyAccess=main
Environment=OPTIONS= CREATE_SIZE=
EnvironmentFile=/etc/pmemfs/%i.conf
ExecStartPre=/bin/mkdir -p ${MOUNTPOINT}
ExecStartPre=/bin/sh -c '[ -e "$$REGION" ] || [ -z "$$CREATE_SIZE" ] || exec @MKFS@ --size "$$CREATE_SIZE" "$$REGION"'
ExecStart=@PMEMFS@ mount -f -o ${OPTIONS} ${REGION} ${MOUNTPOINT}
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM: the supervisor unmounts, its daemon marks the region clean, both exit.
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


def unit_text() -> str:
    return UNIT_TEMPLATE.replace("@PMEMFS@", executable("pmemfs")).replace("@MKFS@", executable("pmemfs-mkfs"))


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

    fds go along as SCM_RIGHTS (systemd's FDSTORE=1 uses that; the live-update work will).
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
