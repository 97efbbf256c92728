"""`pmemfs mount` / `umount` / mount(8): what a person types, and the one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

from pmemfs import mounting

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


def test_mount_8_with_the_program_in_the_source(region, tmp_path):
    mp = str(tmp_path / "m")
    os.mkdir(mp)
    r = subprocess.run(["mount", "-t", "fuse", f"{BIN}/pmemfs#{region}", mp, "-o", "allow_other"],
                       capture_output=True, text=True, timeout=120)
    try:
        assert r.returncode == 0, r.stderr
        entry = mounting.pmemfs_mount_at(mp)
        assert entry is not None and entry.source == region
        with open("/proc/self/mounts") as f:
            line = next(ln for ln in f if f" {mp} " in ln)
        assert "allow_other" in line
    finally:
        pmemfs("umount", mp)
    assert mounting.pmemfs_mount_at(mp) is None
