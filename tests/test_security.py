"""Access through the control channel, as unprivileged users on a real allow_other mount.

Every control verb is tried by users who may and users who may not use it; the errno
of a refusal is the one docs/DESIGN.md's access table gives. The unprivileged side runs
under setpriv with made-up uids and groups (no /etc/passwd entries are needed).
"""

from __future__ import annotations

import errno
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


def test_lease_access(tree):
    m = tree
    code = """
out['ro_readonly'] = try_(os.setxattr, 'open/ro', 'user.pmemfs.lease', b'ro')      # kernel: no write
out['ro_writeonly'] = try_(os.setxattr, 'open/wo', 'user.pmemfs.lease', b'ro')     # daemon: no read
out['rw_team'] = try_(os.setxattr, 'open/team', 'user.pmemfs.lease', b'rw')
out['release_none'] = try_(os.setxattr, 'open/rw', 'user.pmemfs.lease', b'release')
out['rw'] = try_(os.setxattr, 'open/rw', 'user.pmemfs.lease', b'rw')
out['holders'] = json.loads(os.getxattr('open/rw', 'user.pmemfs.lease'))
out['me'] = os.getpid()
out['release'] = try_(os.setxattr, 'open/rw', 'user.pmemfs.lease', b'release')
out['list_ro'] = try_(lambda: json.loads(os.getxattr('open/ro', 'user.pmemfs.lease')))
out['list_secret'] = try_(os.getxattr, 'open/secret', 'user.pmemfs.lease')
"""
    out = as_user(m.p(), code, ATTACKER)
    assert out.pop("holders") == [{"pid": out.pop("me"), "mode": "rw", "count": 1}]
    assert out == {"ro_readonly": "EACCES", "ro_writeonly": "EACCES", "rw_team": "EACCES",
                   "release_none": "ENOENT", "rw": "ok", "release": "ok", "list_ro": [],
                   "list_secret": "EACCES"}
    out = as_user(m.p(), "out['rw_team'] = try_(os.setxattr, 'open/team', 'user.pmemfs.lease', b'rw')",
                  FRIEND, groups=(TEAM,))
    assert out == {"rw_team": "ok"}  # and the lease died with the process:
    assert json.loads(os.getxattr(m.p("open/team"), "user.pmemfs.lease")) == []


def test_align_and_prealloc_access(tree):
    m = tree
    os.mkdir(m.p("pub", "mine"))
    os.chown(m.p("pub", "mine"), ATTACKER, ATTACKER)
    code = """
A, P = 'user.pmemfs.align', 'user.pmemfs.prealloc'
os.close(os.open('pub/own', os.O_CREAT | os.O_WRONLY, 0o644))
out['align_ro'] = try_(os.setxattr, 'open/ro', A, b'1G')
out['align_rw'] = try_(os.setxattr, 'open/rw', A, b'2M')              # any writer, as any user.* xattr
out['align_sticky'] = try_(os.setxattr, 'pub', A, b'1G')              # root's sticky directory
out['align_mine'] = try_(os.setxattr, 'pub/mine', A, b'1G')
out['align_bad'] = try_(os.setxattr, 'pub/own', A, b'3M')
out['get_rw'] = try_(lambda: [os.getxattr('open/rw', A).decode()])
out['get_secret'] = try_(os.getxattr, 'open/secret', A)
out['get_none'] = try_(os.getxattr, 'pub/own', A)
out['prealloc_ro'] = try_(os.setxattr, 'open/ro', P, b'8M')
out['prealloc_own'] = try_(os.setxattr, 'pub/own', P, b'4M')
out['own_size'] = os.stat('pub/own').st_size
out['prealloc_rw'] = try_(os.setxattr, 'open/rw', P, b'8M')           # as fallocate: any writer
out['prealloc_negative'] = try_(os.setxattr, 'pub/own', P, b'-1')
out['prealloc_huge'] = try_(os.setxattr, 'pub/own', P, b'99999999999999999999P')
out['prealloc_too_big'] = try_(os.setxattr, 'pub/own', P, b'1P')
"""
    out = as_user(m.p(), code, ATTACKER)
    assert out == {"align_ro": "EACCES", "align_rw": "ok", "align_sticky": "EPERM", "align_mine": "ok",
                   "align_bad": "EINVAL", "get_rw": ["2M"], "get_secret": "EACCES", "get_none": "ENODATA",
                   "prealloc_ro": "EACCES", "prealloc_own": "ok", "own_size": 4 << 20, "prealloc_rw": "ok",
                   "prealloc_negative": "EINVAL", "prealloc_huge": "EINVAL", "prealloc_too_big": "ENOSPC"}
    assert read_file(m.p("open/rw")) == m.data["open/rw"] + bytes(4 << 20)  # kept, and grown
    assert os.getxattr(m.p("pub", "mine"), "user.pmemfs.align") == b"1G"


def test_extents_reveal_region_offsets_only_to_those_who_may_read_the_region(tree):
    m = tree
    code = """
X = 'user.pmemfs.extents'
out['ro'] = try_(lambda: json.loads(os.getxattr('open/ro', X)))
out['secret'] = try_(os.getxattr, 'open/secret', X)
"""
    mine = json.loads(os.getxattr(m.p("open/ro"), "user.pmemfs.extents"))
    assert all(isinstance(ro, int) for _, ro, _ in mine)  # root sees where the data is
    hidden = [[fo, None, n] for fo, _, n in mine]
    assert as_user(m.p(), code, ATTACKER) == {"ro": hidden, "secret": "EACCES"}
    os.chown(m.region, 0, TEAM)
    os.chmod(m.region, 0o640)  # the region readable by group TEAM: they may see offsets
    assert as_user(m.p(), code, FRIEND, groups=(TEAM,)) == {"ro": mine, "secret": "EACCES"}
    assert as_user(m.p(), code, ATTACKER)["ro"] == hidden


def test_trusted_verbs_need_cap_sys_admin(tree):
    m = tree
    code = """
for verb, value in (('defrag', b''), ('kernel.create', b'{"name": "x", "type": "generic", "size": 4096}'),
                    ('kernel.preserve', b'obj'), ('kernel.unpreserve', b'obj'), ('kernel.retrieve', b'obj'),
                    ('kernel.rm', b'obj'), ('kernel.freeze', b''), ('kernel.unfreeze', b''),
                    ('kernel.finish', b'reclaim')):
    out['set ' + verb] = try_(os.setxattr, '.', 'trusted.pmemfs.' + verb, value)
for verb in ('defrag', 'kernel.list'):
    out['get ' + verb] = try_(os.getxattr, '.', 'trusted.pmemfs.' + verb)
out['get kernel'] = try_(os.getxattr, '.kernel/obj', 'trusted.pmemfs.kernel')
out['list'] = sorted(os.listdir('.kernel')) if try_(os.listdir, '.kernel') == 'ok' else try_(os.listdir, '.kernel')
"""
    from pmemfs.kernel import KernelObjects

    KernelObjects(m.path).create("obj", "generic", 4096)
    refused = {f"set {v}": "EPERM" for v in ("defrag", "kernel.create", "kernel.preserve", "kernel.unpreserve",
                                            "kernel.retrieve", "kernel.rm", "kernel.freeze", "kernel.unfreeze",
                                            "kernel.finish")}
    refused |= {"get defrag": "ENODATA", "get kernel.list": "ENODATA"}
    out = as_user(m.p(), code, ATTACKER)
    assert out == {**refused, "get kernel": "EACCES", "list": "EACCES"}  # /.kernel is root's, 0700
    out = as_user(m.p(), code, 0, extra=tuple(NO_ADMIN))  # uid 0 is not enough
    assert out == {**refused, "get kernel": "ENODATA", "list": ["obj"]}
    assert [o["name"] for o in KernelObjects(m.path).list()] == ["obj"]
    # CAP_SYS_ADMIN without uid 0: the kernel admits trusted.*, and so does the daemon.
    code = """
out['list'] = try_(lambda: [o['name'] for o in json.loads(os.getxattr('.', 'trusted.pmemfs.kernel.list'))])
out['create'] = try_(os.setxattr, '.', 'trusted.pmemfs.kernel.create', b'{"name": "y", "type": "generic", "size": 1}')
out['defrag'] = try_(os.setxattr, '.', 'trusted.pmemfs.defrag', b'')
"""
    out = as_user(m.p(), code, ATTACKER, extra=("--inh-caps=+sys_admin", "--ambient-caps=+sys_admin"))
    assert out == {"list": ["obj"], "create": "ok", "defrag": "ok"}
    assert [o["name"] for o in KernelObjects(m.path).list()] == ["obj", "y"]


def test_user_control_xattrs_only_on_files_and_directories(tree):
    """As the kernel: user.* on a symlink, FIFO or device is EPERM to set, ENODATA to get,
    for root too."""
    m = tree
    os.mkfifo(m.p("pub", "fifo"))
    os.mknod(m.p("pub", "null"), 0o666 | 0o020000, os.makedev(1, 3))
    for path in (m.p("link"), m.p("pub", "fifo"), m.p("pub", "null")):
        for name in ("user.pmemfs.lease", "user.pmemfs.prealloc", "user.pmemfs.align", "user.pmemfs.carve"):
            with pytest.raises(OSError) as ei:
                os.setxattr(path, name, b"1M", follow_symlinks=False)
            assert ei.value.errno == errno.EPERM, (path, name)
        for name in ("user.pmemfs.lease", "user.pmemfs.extents", "user.pmemfs.align"):
            with pytest.raises(OSError) as ei:
                os.getxattr(path, name, follow_symlinks=False)
            assert ei.value.errno == errno.ENODATA, (path, name)
    assert read_file(m.p("open/rw")) == m.data["open/rw"]


# ------------------------------------------------ the daemon's own checks (no FUSE)
def test_daemon_checks_what_the_kernel_checked(engine):
    """Requests the kernel would have refused, handed straight to the control channel:
    the daemon refuses them too (a mount without default_permissions, or a kernel bug,
    gets no further)."""
    from pmemfs.fs.creds import ALL_CAPS, Creds
    from pmemfs.fs.engine import Ctx, FsError
    from pmemfs.media.format import ROOT_INO
    from pmemfs.serve import control

    e = engine

    def err(fn, *a) -> str:
        try:
            fn(*a)
        except FsError as x:
            return errno.errorcode[x.errno]
        return "ok"

    def as_(uid, groups=(), caps=0):
        return Ctx(uid, uid, 0, creds=Creds(uid, uid, frozenset(groups), caps))

    user, root_no_caps, admin = as_(ATTACKER), as_(0), as_(ATTACKER, caps=ALL_CAPS)
    src = e.create(ROOT_INO, b"src", 0o666).ino
    e.write(src, 0, b"s" * MB2)
    dst = e.create(ROOT_INO, b"dst", 0o644).ino  # root's: others may not write it
    lnk = e.symlink(ROOT_INO, b"lnk", b"src").ino
    sticky = e.mkdir(ROOT_INO, b"sticky", 0o1777).ino
    secret = e.create(ROOT_INO, b"secret", 0o600).ino
    carve = json.dumps({"src": "src", "offset": 0, "length": MB2}).encode()
    c, q = control.command, control.query
    assert err(c, e, dst, control.CARVE, carve, user) == "EACCES"  # the destination
    assert err(c, e, lnk, control.PREALLOC, b"2M", user) == "EPERM"
    assert err(c, e, lnk, control.LEASE, b"ro", as_(0, caps=ALL_CAPS)) == "EPERM"
    assert err(q, e, lnk, control.EXTENTS, user) == "ENODATA"
    assert err(c, e, sticky, control.ALIGN, b"1G", user) == "EPERM"
    assert err(q, e, secret, control.EXTENTS, user) == "EACCES"
    assert err(q, e, secret, control.LEASE, user) == "EACCES"
    assert err(c, e, secret, control.ALIGN, b"1G", user) == "EACCES"
    for ctx in (user, root_no_caps):
        assert err(c, e, ROOT_INO, control.DEFRAG, b"", ctx) == "EPERM"
        assert err(c, e, ROOT_INO, control.KERNEL + b".freeze", b"", ctx) == "EPERM"
        assert err(q, e, ROOT_INO, control.KERNEL + b".list", ctx) == "ENODATA"
        assert err(e.setxattr, src, b"trusted.x", b"1", 0, ctx) == "EPERM"
    assert err(q, e, ROOT_INO, control.KERNEL + b".list", admin) == "ok"
    assert err(c, e, sticky, control.ALIGN, b"1G", as_(0, caps=ALL_CAPS)) == "ok"  # CAP_FOWNER
    assert bytes(e.read(src, 0, MB2)) == b"s" * MB2 and e.stat(dst).size == 0


def test_credentials_of_a_process(tmp_path):
    """Groups and capabilities come from /proc; anything doubtful counts as nothing."""
    from pmemfs.fs import creds

    me = creds.of_process(os.getuid(), os.getgid(), os.getpid())
    assert me.capable(creds.CAP_SYS_ADMIN) and me.groups == frozenset(os.getgroups())
    assert creds.of_process(ATTACKER, ATTACKER, os.getpid()) == creds.Creds(ATTACKER, ATTACKER)  # ids differ
    p = subprocess.Popen(["setpriv", f"--reuid={FRIEND}", f"--regid={FRIEND}", f"--groups={TEAM}",
                          "sleep", "30"])
    try:
        assert wait_for_status(p.pid)
        friend = creds.of_process(FRIEND, FRIEND, p.pid)
        assert friend == creds.Creds(FRIEND, FRIEND, frozenset({TEAM}), 0)
    finally:
        p.kill()
        p.wait()
    assert creds.of_process(FRIEND, FRIEND, p.pid) == creds.Creds(FRIEND, FRIEND)  # gone
    assert creds.of_process(0, 0, 0) == creds.Creds(0, 0)  # outside our pid namespace


def wait_for_status(pid: int) -> bool:
    """Until setpriv has exec'd sleep (setpriv changes the uid first, keeping its
    capabilities, and drops them after)."""
    from conftest import wait_for

    def ready() -> bool:
        try:
            with open(f"/proc/{pid}/status") as f:
                return "Name:\tsleep\n" in f.read()
        except OSError:
            return False

    return wait_for(ready)


def cli_as(cwd: str, uid: int, *args: str) -> subprocess.CompletedProcess:
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", sys.executable, "-c",
           "import sys; from pmemfs.tools.cli import main; main(sys.argv[1:])", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def one_line_error(r: subprocess.CompletedProcess, words: str) -> None:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr


def test_cli_commands_as_an_unprivileged_user(tree):
    m = tree
    r = cli_as(m.p(), ATTACKER, "map", "open/ro")
    assert r.returncode == 0 and "hidden" in r.stdout and "2 blocks" not in r.stderr, r.stdout + r.stderr
    r = cli_as(m.p(), ATTACKER, "map", "--json", "open/ro")
    assert [e["region_offset"] for e in json.loads(r.stdout)["extents"]] == [None]
    one_line_error(cli_as(m.p(), ATTACKER, "map", "open/secret"), "Permission denied")
    one_line_error(cli_as(m.p(), ATTACKER, "defrag", "."), "Operation not permitted")
    one_line_error(cli_as(m.p(), ATTACKER, "kernel", "create", "--size", "4K", ".", "x"), "Operation not permitted")
    one_line_error(cli_as(m.p(), ATTACKER, "kernel", "list", "."), "")
    one_line_error(cli_as(m.p(), ATTACKER, "info", "."), "Permission denied")  # the region is root's
    one_line_error(cli_as(m.p(), ATTACKER, "umount", m.path), "")
    assert os.statvfs(m.path).f_bsize == MB2  # still mounted and answering
    os.mkdir(m.p("pub", "mp"))
    os.chown(m.p("pub", "mp"), ATTACKER, ATTACKER)
    one_line_error(cli_as(m.p(), ATTACKER, "mount", m.region, "pub/mp"), "")
    one_line_error(cli_as(m.p(), ATTACKER, "carve", "victim/data", "0", "2M", "pub/x"), "Permission denied")
    assert not os.path.exists(m.p("pub", "x")) and read_file(m.p("victim/data")) == m.data["victim/data"]
    r = cli_as(m.p(), ATTACKER, "carve", "open/rw", "2M", "2M", "pub/y")
    assert r.returncode == 0, r.stderr
    assert read_file(m.p("pub", "y")) == m.data["open/rw"][MB2:]
    r = cli_as(m.p(), ATTACKER, "prealloc", "pub/z", "4M")
    assert r.returncode == 0 and os.stat(m.p("pub", "z")).st_size == 4 << 20, r.stderr


def test_carve_through_a_bind_mount_of_a_subdirectory(tree, tmp_path):
    """pmemfs carve names src from the filesystem's root, also when it is reached
    through a bind mount of a subdirectory (whose root is not the filesystem's)."""
    m = tree
    bind = str(tmp_path / "bind")
    os.mkdir(bind)
    subprocess.run(["mount", "--bind", m.p("open"), bind], check=True)
    try:
        r = cli_as(bind, VICTIM, "carve", "rw", "0", "2M", "ro.part")
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["umount", bind], check=True)
    assert read_file(m.p("open", "ro.part")) == m.data["open/rw"][:MB2]
    assert read_file(m.p("open", "ro")) == m.data["open/ro"]
