"""pmemfs-mkfs and `pmemfs info` as a person runs them: one-line errors, summaries, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
from conftest import new_region_path

from pmemfs.media.format import BLOCK_1G, BLOCK_2M, Geometry, Tables, read_superblock
from pmemfs.media.region import Region

MiB = 1 << 20
GiB = 1 << 30
BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tool: str, *args: str | bytes) -> subprocess.CompletedProcess:
    exe = os.path.join(BIN, tool)
    assert os.path.exists(exe), exe
    return subprocess.run([exe, *args], capture_output=True, text=True, errors="replace", timeout=60)


def mkfs(*args: str | bytes) -> subprocess.CompletedProcess:
    return run("pmemfs-mkfs", *args)


def info_json(target: str) -> dict:
    r = run("pmemfs", "info", "--json", target)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def path():
    p = new_region_path()
    yield p
    if os.path.exists(p):
        os.unlink(p)


@contextlib.contextmanager
def mounted_tmpfs(where: str, *options: str):
    os.makedirs(where, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=64m", *options)), "none", where],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", where], check=True)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(("args", "words"), [
    ((), ["no such region", "--size"]),
    (("--size", "2M"), ["too small", "metadata and one data block"]),
    (("--size", "5M"), ["not a multiple of the block size"]),
    (("--size", "12Q"), ["--size", "'12Q' is not a size"]),
    (("--size", "0"), ["--size", "must be positive"]),
    (("--size", "9999999P"), ["blocks of 2097152 bytes is too large"]),  # extent indices are u32
    (("--size", "4000P"), ["too large", "(use 1G blocks)"]),
    (("--size", "1000P", "--block-size", "1G"), ["does not fit in tmpfs /dev/shm", "--sparse"]),
    (("--sparse", "--size", "1000P", "--block-size", "1G"), ["cannot map"]),
    (("--sparse", "--prefault", "--size", "64M"), ["--prefault", "--sparse"]),
    (("--size", "64M", "--block-size", "4M"), ["--block-size", "4M"]),
    (("--size", "64M", "--label", "x" * 65), ["label", "longer than 64 bytes"]),
    (("--size", "64M", "--label", b"bad\xff"), ["label", "not valid UTF-8"]),
    (("--size", "64M", "--inodes", "3"), ["inode count 3"]),
], ids=lambda v: " ".join(x if isinstance(x, str) else repr(x) for x in v) if isinstance(v, tuple) else None)
def test_error_is_one_line_and_creates_nothing(path, args, words):
    r = mkfs(*args, path)
    assert_one_line_error(r, *words)
    assert not os.path.exists(path)


def test_mkfs_pmemfs_alias_reports_errors_the_same_way(path):
    r = run("mkfs.pmemfs", path)
    assert_one_line_error(r, path, "no such region")


@pytest.mark.parametrize("where", ["/dev/null", "/dev/shm"])
def test_not_a_region(where):
    assert_one_line_error(mkfs("--force", where), where)


def test_missing_directory(tmp_path):
    assert_one_line_error(mkfs("--size", "64M", str(tmp_path / "no" / "r")), "does not exist")


def test_unwritable_location(tmp_path):
    with mounted_tmpfs(str(tmp_path / "ro"), "ro") as ro:
        target = os.path.join(ro, "region")
        assert_one_line_error(mkfs("--size", "64M", target), target, "Read-only file system")


def test_hugetlbfs_page_size_multiple(tmp_path):
    """A 1 GiB-page hugetlbfs takes no 2M-multiple: needs no pages to find out."""
    if not os.path.isdir("/sys/kernel/mm/hugepages/hugepages-1048576kB"):
        pytest.fail("this machine has no 1 GiB huge page size")
    mnt = str(tmp_path / "huge1g")
    os.makedirs(mnt)
    subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=1G", "none", mnt], check=True)
    try:
        target = os.path.join(mnt, "region")
        assert_one_line_error(mkfs("--size", "64M", target),
                              "not a multiple of the hugetlbfs page size 1073741824")
        assert not os.path.exists(target)
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_existing_pmemfs_needs_force(path):
    first = mkfs("--json", "--size", "64M", path)
    assert first.returncode == 0, first.stderr
    uuid1 = json.loads(first.stdout)["uuid"]
    assert_one_line_error(mkfs(path), path, "already holds a pmemfs", "--force")
    assert_one_line_error(mkfs("--size", "64M", path), "already holds a pmemfs", "--force")
    assert_one_line_error(mkfs("--size", "128M", path), "exists with size")
    assert info_json(path)["uuid"] == uuid1  # untouched by the refusals
    again = mkfs("--force", "--json", path)
    assert again.returncode == 0, again.stderr
    uuid2 = json.loads(again.stdout)["uuid"]
    assert uuid2 != uuid1 and info_json(path)["uuid"] == uuid2


def test_existing_pmemfs_with_only_its_backup_superblock(path):
    assert mkfs("--size", "64M", path).returncode == 0
    with Region(path) as r:
        r.buf[:4096] = bytes(4096)
    assert_one_line_error(mkfs(path), "backup superblock", "--force")


def test_existing_ext4_signature_is_refused(path):
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(1080)
        f.write((0xEF53).to_bytes(2, "little"))
    assert_one_line_error(mkfs(path), "ext2/3/4", "--force")
    with open(path, "rb") as f:
        f.seek(1080)
        assert f.read(2) == b"\x53\xef"  # refused means untouched
    assert mkfs("--force", path).returncode == 0


def test_locked_by_a_running_daemon(region, mount_factory):
    m = mount_factory(region)
    line = assert_one_line_error(mkfs("--force", region), "in use", f"process {m.pid}")
    assert region in line


# ------------------------------------------------------------------ success
@pytest.mark.parametrize("tool", ["pmemfs-mkfs", "mkfs.pmemfs"])
def test_summary_line(path, tool):
    r = run(tool, "--size", "256M", "--label", "scratch", path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    g = Geometry.plan(256 * MiB, BLOCK_2M)
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"{path}: pmemfs 256.0 MiB, 2.0 MiB blocks, ")
    assert f"{g.data_blocks} data blocks" in first
    assert f"{g.inode_count - 1} inodes" in first
    with Region(path, writable=False, lock=False) as reg:
        sb, _ = read_superblock(reg.buf, reg.size)
    assert f"uuid {sb.uuid_str}" in first and sb.label == "scratch"


def test_json_summary_matches_the_region(path):
    r = mkfs("--json", "--size", "512M", "--inodes", "1000", "-L", "ünï", path)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    g = Geometry.plan(512 * MiB, BLOCK_2M, 1000)
    assert s["region"] == path and s["label"] == "ünï"
    assert (s["region_size"], s["block_size"]) == (512 * MiB, BLOCK_2M)
    assert (s["data_blocks"], s["inodes"]) == (g.data_blocks, 1000)
    assert s["metadata_bytes"] == g.metadata_bytes
    i = info_json(path)
    for k in ("uuid", "label", "region_size", "block_size", "data_blocks"):
        assert i[k] == s[k], k


def test_1g_blocks(path):
    r = mkfs("--json", "--sparse", "--size", "2G", "--block-size", "1G", path)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["block_size"], s["data_blocks"], s["metadata_bytes"]) == (BLOCK_1G, 1, GiB)
    assert s["sparse"] and s["reserved_bytes"] == os.stat(path).st_blocks * 512
    assert os.stat(path).st_blocks * 512 < 4 * MiB  # still sparse
    i = info_json(path)
    assert (i["block_size"], i["data_blocks"], i["free_blocks"]) == (BLOCK_1G, 1, 1)


def test_prefault_populates_the_data_area(path):
    r = mkfs("--prefault", "--size", "32M", path)
    assert r.returncode == 0, r.stderr
    g = Geometry.plan(32 * MiB, BLOCK_2M)
    assert os.stat(path).st_blocks * 512 >= g.data_blocks * BLOCK_2M


# ------------------------------------------------------------------ info
def test_info_of_a_fresh_region(path):
    assert mkfs("--size", "64M", "-L", "my label", path).returncode == 0
    with Region(path, writable=False, lock=False) as reg:
        sb, _ = read_superblock(reg.buf, reg.size)
    g = sb.geometry
    i = info_json(path)
    assert i["format_version"] == f"{sb.version_major}.{sb.version_minor}"
    assert (i["uuid"], i["label"], i["superblock"]) == (sb.uuid_str, "my label", "primary")
    assert (i["region_size"], i["block_size"], i["data_blocks"]) == (64 * MiB, BLOCK_2M, g.data_blocks)
    assert (i["used_blocks"], i["free_blocks"], i["bad_blocks"]) == (0, g.data_blocks, 0)
    assert (i["inodes_total"], i["inodes_used"], i["directories"]) == (g.inode_count - 1, 1, 1)
    assert (i["state"], i["mount_generation"], i["mounted_by_pid"]) == ("clean", 0, 0)
    assert i["journal"] == "idle"
    text = run("pmemfs", "info", path)
    assert text.returncode == 0, text.stderr
    rows = {line.split("  ")[0].strip(): line.split("  ", 1)[1].strip()
            for line in text.stdout.splitlines()}
    assert rows["format version"] == i["format_version"]
    assert rows["uuid"] == sb.uuid_str and rows["label"] == "my label"
    assert rows["state"] == "clean" and rows["mount generation"] == "0"
    assert rows["region size"].startswith(f"{64 * MiB} (64.0 MiB)")
    assert rows["free blocks"] == str(g.data_blocks)


def test_info_counts_a_block_that_is_used_and_bad_once(region):
    with Region(region) as r:
        sb, _ = read_superblock(r.buf, r.size)
        g = sb.geometry
        t = Tables(r.buf, sb)
        d = g.data_start_block

        def setbit(bitmap, b):
            bitmap[b // 8] |= 1 << (b % 8)

        setbit(t.bitmap, d)  # used and bad
        setbit(t.badmap, d)
        setbit(t.badmap, d + 1)  # bad only
        setbit(t.bitmap, d + 2)  # used only
        del t
    i = info_json(region)
    assert (i["used_blocks"], i["bad_blocks"]) == (2, 2)
    assert i["free_blocks"] == g.data_blocks - 3


def test_info_errors_are_one_line(path, tmp_path):
    assert_one_line_error(run("pmemfs", "info", path), path, "no such region")
    assert_one_line_error(run("pmemfs", "info", str(tmp_path)), "no pmemfs is mounted there")
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    assert_one_line_error(run("pmemfs", "info", path), "bad magic", "no valid backup superblock")


def test_info_while_mounted_and_after(region, mount_factory):
    m = mount_factory(region)
    with open(m.p("f"), "wb") as f:
        f.write(os.urandom(3 * MiB))
    os.mkdir(m.p("d"))
    for target in (m.path, region):
        i = info_json(target)
        assert i["region"] == os.path.abspath(region)
        assert (i["state"], i["mounted_by_pid"], i["mount_generation"]) == ("dirty", m.pid, 1)
        assert (i["used_blocks"], i["free_blocks"]) == (2, i["data_blocks"] - 2)
        assert (i["inodes_used"], i["files"], i["directories"]) == (3, 1, 2)
    text = run("pmemfs", "info", m.path)
    assert text.returncode == 0, text.stderr
    rows = [line.split() for line in text.stdout.splitlines()]
    assert ["mounted", "by", "pid", str(m.pid)] in rows and ["state", "dirty"] in rows
    m.unmount()
    i = info_json(region)
    assert (i["state"], i["mounted_by_pid"], i["mount_generation"]) == ("clean", 0, 1)
    assert i["last_unmount"] != "never" and i["used_blocks"] == 2
