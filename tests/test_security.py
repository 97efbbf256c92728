"""Access through the control channel, as unprivileged users on a real allow_other mount.

Every control verb is tried by users who may and users who may not use it; the errno
of a refusal is the one docs/DESIGN.md's access table gives. The unprivileged side runs
under setpriv with made-up uids and groups (no /etc/passwd entries are needed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

MB2 = 2 << 20
VICTIM, ATTACKER, FRIEND = 61001, 61002, 61003  # uids
TEAM = 61100  # a supplementary group of FRIEND only
CARVE = "user.pmemfs.carve"

# The unprivileged side: try(fn, *args) answers "ok" or the errno name.
PRELUDE = """
import errno, json, os, sys
def try_(fn, *a, **kw):
    try:
        r = fn(*a, **kw)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return r if isinstance(r, (list, dict)) else "ok"
def carve(dst, src, offset, length):
    os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o600))
    os.setxattr(dst, "user.pmemfs.carve", json.dumps({"src": src, "offset": offset, "length": length}).encode())
out = {}
"""


def as_user(cwd: str, code: str, uid: int, gid: int | None = None, groups: tuple[int, ...] = ()) -> dict:
    """Run python `code` (which fills the dict `out`) as uid/gid/groups with cwd, and return out.

    The working directory is entered as root before the privileges go (pytest's
    temporary directories are 0700), so the child reaches the mount only through it.
    """
    gid = uid if gid is None else gid
    grp = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}", *grp, "--", sys.executable, "-I", "-c",
           PRELUDE + code + "\nprint(json.dumps(out))\n"]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def write_file(path: str, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def shared(region_factory, mount_factory):
    """An allow_other mount with a world-writable sticky /pub for everyone's files."""
    m = mount_factory(region_factory(size=128 << 20), {"allow_other"})
    os.chmod(m.path, 0o755)
    os.mkdir(m.p("pub"))
    os.chmod(m.p("pub"), 0o1777)
    return m


def test_carve_from_a_file_under_someone_elses_private_directory_is_refused(shared):
    """The reported attack: a 0666 file under another user's 0700 directory."""
    m = shared
    os.mkdir(m.p("victim"))
    os.chown(m.p("victim"), VICTIM, VICTIM)
    os.chmod(m.p("victim"), 0o700)
    secret = os.urandom(2 * MB2)
    write_file(m.p("victim", "data"), secret, 0o666, VICTIM, VICTIM)
    out = as_user(m.p("pub"), "out['carve'] = try_(carve, 'loot', 'victim/data', 0, 2 << 20)\n"
                              "out['size'] = os.stat('loot').st_size", ATTACKER)
    assert out == {"carve": "EACCES", "size": 0}
    assert read_file(m.p("victim", "data")) == secret
