"""`pmemfs mount` / `umount` / mount(8): what a person types, and the one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from conftest import drop_caches, superblock_state, wait_for

from pmemfs.fs.engine import Engine
from pmemfs.media.format import ROOT_INO, STATE_CLEAN
from pmemfs.serve import mounting

BIN = os.path.dirname(sys.executable)


def pmemfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "pmemfs"), *args], capture_output=True, text=True, timeout=120)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_mount_umount_cycle_marks_clean(region, tmp_path):
    mp = str(tmp_path / "m")
    os.mkdir(mp)
    r = pmemfs("mount", region, mp)
    try:
        assert r.returncode == 0, r.stderr
        assert "mounted" in r.stdout
        entry = mounting.pmemfs_mount_at(mp)
        assert entry is not None and entry.fstype == "fuse.pmemfs" and entry.source == region
        with open(os.path.join(mp, "x"), "w") as f:
            f.write("x")
    finally:
        u = pmemfs("umount", mp)
    assert u.returncode == 0, u.stderr
    assert mounting.region_holder(region) is None  # the daemon is gone: umount waited
    info = pmemfs("info", region)
    assert "clean" in info.stdout


def test_mount_errors_are_one_line(region, region_factory, tmp_path, mount_factory):
    mp = str(tmp_path / "m")
    os.mkdir(mp)
    one_line_error(pmemfs("mount", "/dev/shm/no-such-region", mp), "no such region")
    one_line_error(pmemfs("mount", region, str(tmp_path / "missing")), "not a directory")
    inside = str(tmp_path / "m" / "r.region")
    with open(inside, "wb"):
        pass
    one_line_error(pmemfs("mount", inside, mp), "inside the mountpoint")
    os.unlink(inside)
    one_line_error(pmemfs("mount", "-o", "bogus", region, mp), "unknown mount option")
    with open(str(tmp_path / "garbage"), "wb") as f:
        f.write(b"\1" * (8 << 20))
    one_line_error(pmemfs("mount", str(tmp_path / "garbage"), mp), "not a pmemfs region")
    m = mount_factory(region)
    one_line_error(pmemfs("mount", region, mp), "in use by process", str(m.pid))
    other = region_factory()
    one_line_error(pmemfs("mount", other, m.path), "already mounted")
    one_line_error(pmemfs("umount", mp), "no pmemfs is mounted")


def test_mount_clears_a_dead_mountpoint(mounted):
    with open(mounted.p("keep"), "w") as f:
        f.write("kept")
    mounted.kill()
    assert mounting.is_stale(mounted.path)
    r = pmemfs("mount", mounted.region, mounted.path)
    assert r.returncode == 0, r.stderr
    assert "cleared a dead mount" in r.stdout
    mounted.proc = None  # the new daemon is not ours to wait for; unmount it by hand
    try:
        with open(mounted.p("keep")) as f:
            assert f.read() == "kept"
    finally:
        assert pmemfs("umount", mounted.path).returncode == 0


def read_back(region: str, name: bytes) -> bytes:
    """A file's bytes read straight from the region (the Engine, no FUSE)."""
    e = Engine(region)
    try:
        ino = e.lookup(ROOT_INO, name)
        return bytes(e.read(ino, 0, e.stat(ino).size))
    finally:
        e.close()


def released_and_clean(region: str) -> None:
    assert wait_for(lambda: mounting.region_holder(region) is None, timeout=30), "the daemon still runs"
    assert superblock_state(region) == STATE_CLEAN


def test_mount_8_with_the_program_in_the_source(region, tmp_path):
    mp = str(tmp_path / "m")
    os.mkdir(mp)
    r = subprocess.run(["mount", "-t", "fuse", f"{BIN}/pmemfs#{region}", mp, "-o", "allow_other"],
                       capture_output=True, text=True, timeout=120)
    data = os.urandom(3 << 20)
    try:
        assert r.returncode == 0, r.stderr
        entry = mounting.pmemfs_mount_at(mp)
        assert entry is not None and entry.source == region
        with open("/proc/self/mounts") as f:
            line = next(ln for ln in f if f" {mp} " in ln)
        assert "allow_other" in line
        with open(os.path.join(mp, "f"), "wb") as f:
            f.write(data)
        drop_caches()
        with open(os.path.join(mp, "f"), "rb") as f:
            assert f.read() == data
    finally:
        u = subprocess.run(["umount", mp], capture_output=True, text=True, timeout=60)
        if mounting.pmemfs_mount_at(mp) is not None:
            mounting.unmount(mp)
    assert u.returncode == 0, u.stderr
    assert mounting.pmemfs_mount_at(mp) is None
    released_and_clean(region)
    assert read_back(region, b"f") == data


# mount(8) runs its helpers with no PATH, so /bin/sh's default one applies and the type
# fuse.pmemfs needs a `pmemfs` in /usr/local/bin or the like (README). The test puts one
# there only inside a private mount namespace, where the whole mount's life happens.
NS_SCRIPT = r"""
import json, os, subprocess, sys
bindir, mp, data_path, fstab, region = sys.argv[1:6]
out = {}
def run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return {"rc": r.returncode, "err": r.stderr.strip()}
out["bind"] = run("mount", "--bind", bindir, "/usr/local/bin")
if fstab != "-":
    out["mount"] = run("mount", "-T", fstab, mp)
else:
    out["mount"] = run("mount", "-t", "fuse.pmemfs", "-o", "allow_other", region, mp)
if out["mount"]["rc"] == 0:
    with open("/proc/self/mounts") as f:
        out["line"] = next((ln for ln in f if f" {mp} " in ln), "")
    data = open(data_path, "rb").read()
    with open(os.path.join(mp, "f"), "wb") as f:
        f.write(data)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    out["same"] = open(os.path.join(mp, "f"), "rb").read() == data
    out["umount"] = run("umount", mp)
print(json.dumps(out))
"""


def mount_in_namespace(tmp_path, region: str, fstab: str | None) -> dict:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(os.path.join(BIN, "pmemfs"), bindir / "pmemfs")
    mp = str(tmp_path / "m")
    os.mkdir(mp)
    data = tmp_path / "data"
    data.write_bytes(os.urandom(3 << 20))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", NS_SCRIPT,
                        str(bindir), mp, str(data), fstab or "-", region],
                       capture_output=True, text=True, timeout=180)
    try:
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["bind"]["rc"] == 0, out
        assert out["mount"]["rc"] == 0, out
        fields = out["line"].split()
        assert fields[:3] == [region, mp, "fuse.pmemfs"] and "allow_other" in fields[3], out["line"]
        if fstab:  # the README's line keeps pmemfs's nodev,nosuid through mount(8)
            assert {"nodev", "nosuid"} <= set(fields[3].split(",")), out["line"]
        assert out["same"], "the file read back differs"
        assert out["umount"]["rc"] == 0, out
        released_and_clean(region)
    finally:
        holder = mounting.region_holder(region)
        if holder:  # its mount is in the namespace; killing the daemon ends both
            os.kill(holder, signal.SIGKILL)
            wait_for(lambda: mounting.region_holder(region) is None, timeout=30)
    assert read_back(region, b"f") == data.read_bytes()
    return out


def test_mount_8_type_fuse_pmemfs(region, tmp_path):
    mount_in_namespace(tmp_path, region, None)


def test_fstab_line_with_mount_T(region, tmp_path):
    fstab = tmp_path / "fstab"
    mp = tmp_path / "m"
    fstab.write_text(f"# pmemfs, as README shows it\n{region}  {mp}  fuse.pmemfs  defaults,nodev,nosuid,allow_other  0 0\n")
    mount_in_namespace(tmp_path, region, str(fstab))
