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
NO_ADMIN = ["--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]  # root without CAP_SYS_ADMIN

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


def as_user(cwd: str, code: str, uid: int, gid: int | None = None, groups: tuple[int, ...] = (),
            extra: tuple[str, ...] = ()) -> dict:
    """Run python `code` (which fills the dict `out`) as uid/gid/groups with cwd, and return out.

    The working directory is entered as root before the privileges go (pytest's
    temporary directories are 0700), so the child reaches the mount only through it.
    """
    gid = uid if gid is None else gid
    grp = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}", *grp, *extra, "--", sys.executable, "-I", "-c",
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


@pytest.fixture
def tree(shared):
    """Files of VICTIM with every interesting mode, under directories others may or may
    not search. All data files are two blocks of distinct bytes."""
    m = shared
    for d, mode, gid in (("victim", 0o700, VICTIM), ("open", 0o755, VICTIM), ("team", 0o770, TEAM),
                         ("noexec", 0o776, VICTIM)):
        os.mkdir(m.p(d))
        os.chown(m.p(d), VICTIM, gid)
        os.chmod(m.p(d), mode)
    files = {"victim/data": 0o666, "open/rw": 0o666, "open/ro": 0o644, "open/wo": 0o622,
             "open/secret": 0o600, "open/team": 0o660, "team/f": 0o666, "noexec/f": 0o666}
    data = {}
    for i, (name, mode) in enumerate(files.items()):
        data[name] = bytes([i + 1]) * MB2 + bytes([i + 101]) * MB2
        write_file(m.p(name), data[name], mode, VICTIM, TEAM if name == "open/team" else VICTIM)
    os.symlink("open/rw", m.p("link"))
    os.symlink("../open/rw", m.p("pub", "link"))
    m.data = data
    return m


@pytest.mark.parametrize("src, uid, groups, expect", [
    ("victim/data", ATTACKER, (), "EACCES"),       # no search permission on victim/
    ("noexec/f", ATTACKER, (), "EACCES"),          # readable directory, but no search
    ("open/ro", ATTACKER, (), "EACCES"),           # read only: carving leaves a hole (write)
    ("open/wo", ATTACKER, (), "EACCES"),           # write only: the bytes would be read
    ("open/secret", ATTACKER, (), "EACCES"),
    ("open/team", ATTACKER, (), "EACCES"),         # group TEAM's file, not in TEAM
    ("team/f", ATTACKER, (), "EACCES"),            # TEAM's directory
    ("link", ATTACKER, (), "ELOOP"),               # symbolic links are not followed
    ("open/rw/x", ATTACKER, (), "ENOTDIR"),
    ("open/none", ATTACKER, (), "ENOENT"),
    ("victim/none", ATTACKER, (), "EACCES"),       # nothing is revealed behind a closed door
    ("open/" + "n" * 256, ATTACKER, (), "ENAMETOOLONG"),
    ("open/rw", ATTACKER, (), "ok"),               # 0666: anyone may
    ("pub/../open/./rw", ATTACKER, (), "ok"),
    ("team/f", FRIEND, (TEAM,), "ok"),             # search through a supplementary group
    ("open/team", FRIEND, (TEAM,), "ok"),          # read and write through it
    ("victim/data", VICTIM, (), "ok"),             # the owner
])
def test_carve_access(tree, src, uid, groups, expect):
    m = tree
    out = as_user(m.p("pub"), f"out['r'] = try_(carve, 'dst', {src!r}, {MB2}, {MB2})\n"
                              "out['dst'] = open('dst', 'rb').read().hex() if out['r'] == 'ok' else ''",
                  uid, groups=groups)
    assert out["r"] == expect
    name = os.path.normpath(src) if expect == "ok" else None
    for f, d in m.data.items():
        if f == name:  # the second block moved: a hole in src, the bytes in dst
            assert read_file(m.p(f)) == d[:MB2] + bytes(MB2)
            assert bytes.fromhex(out["dst"]) == d[MB2:]
        else:
            assert read_file(m.p(f)) == d, f


def test_carve_destination_needs_write_permission(tree):
    """The kernel refuses a carve into a file the caller may not write (and the
    daemon would too: see test_daemon_checks_what_the_kernel_checked)."""
    m = tree
    os.close(os.open(m.p("pub", "roots"), os.O_CREAT | os.O_WRONLY, 0o644))
    out = as_user(m.p("pub"), "out['r'] = try_(os.setxattr, 'roots', 'user.pmemfs.carve', "
                              "json.dumps({'src': 'open/rw', 'offset': 0, 'length': 2 << 20}).encode())",
                  ATTACKER)
    assert out["r"] == "EACCES"
    assert read_file(m.p("open/rw")) == m.data["open/rw"]
