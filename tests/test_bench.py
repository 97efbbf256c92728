"""Smoke test of the benchmark harness: tiny sizes, one run; it must complete, leave
nothing mounted, and write the JSON rows. Timings are not asserted."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_requests import LIBFUSE_LINE, PMEMFS_LINE, requests_in  # noqa: E402
from bench_targets import LL_EXAMPLES  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, drop_caches)")
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
# ./run installs gcc, pkg-config and libfuse3-dev: then passthrough_ll must run.
HAVE_LL = (shutil.which("gcc") is not None and shutil.which("pkg-config") is not None
           and any(os.path.exists(f"{LL_EXAMPLES}/passthrough_ll.c{gz}") for gz in ("", ".gz")))
WORKLOADS = ("write 4 KiB, new file", "write 1 MiB, new file", "overwrite 1 MiB", "cold read 1 MiB",
             "random read 4 KiB, cold", "create", "stat, cold dentries", "unlink",
             "write 1 MiB, new files, 2 jobs", "random read 4 KiB, cold, 2 jobs",
             "create, 2 processes", "stat, cold dentries, 2 processes", "unlink, 2 processes")


def _mounts() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line.split()[1] for line in f if "pmemfs-bench-" in line}


@pytest.mark.timeout(300)
@needs_root
@needs_fuse
def test_bench_tiny_completes(tmp_path):
    # Only what this run leaves counts: another benchmark may be running on the machine.
    mounts_before = _mounts()
    shm_before = {p for p in os.listdir("/dev/shm") if p.startswith("pmemfs-bench-")}
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--tiny", "--no-hugetlbfs",
                        "--json", str(out), "--markdown", str(md)],
                       capture_output=True, text=True, timeout=290, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {(row["metric"], row["target"]): row for row in data["rows"]}
    baselines = ["tmpfs", "passthrough"] + (["passthrough_ll"] if HAVE_LL else [])
    if HAVE_LL:
        assert "passthrough_ll" in data["targets"], data["notes"]
    else:
        assert [n for n in data["notes"] if n.startswith("passthrough_ll skipped: ")], data["notes"]
    for metric in WORKLOADS:
        for target in ("pmemfs-shm", *baselines):
            assert rows[(metric, target)]["runs"], (metric, target)
        pm = rows[(metric, "pmemfs-shm")]
        for base in baselines:
            assert pm["baselines"][base]["ratio"] is not None, (metric, base)
        assert pm["goal"].startswith((">= 1x passthrough_ll", "<= 1x passthrough_ll")), pm["goal"]
        assert pm["met"] in ((True, False) if HAVE_LL else (None,)), (metric, pm["met"])
    assert "0.8x tmpfs" in rows[("write 1 MiB, new file", "pmemfs-shm")]["goal"]
    ls_cold = next(row for (m, t), row in rows.items() if m.startswith("ls -l ") and t == "pmemfs-shm")
    assert ls_cold["goal"] == "<= 1x passthrough_ll"
    # pmemfs-wb: served, or skipped because the installed pmemfs refuses -o writeback.
    wb_notes = [n for n in data["notes"] if n.startswith("pmemfs-wb skipped: ")]
    assert ("pmemfs-wb" in data["targets"]) != bool(wb_notes), data["notes"]
    if wb_notes:
        assert "writeback" in wb_notes[0]
    # The counting pass: every write(2) of 4 KiB is at least one WRITE without writeback.
    reqs = {(q["workload"], q["target"]): q for q in data["requests"]}
    w4 = reqs[("write 4 KiB, new file", "pmemfs-shm")]
    assert w4["ops"] > 0 and w4["by_kind"]["write"] >= 1.0, w4
    assert reqs[("stat, cold dentries", "pmemfs-shm")]["by_kind"]["lookup"] >= 1.0
    assert not any(k in q["by_kind"] for q in data["requests"] for k in ("flush", "release", "forget"))
    if HAVE_LL:
        assert reqs[("write 4 KiB, new file", "passthrough_ll")]["by_kind"]["write"] >= 1.0
    assert rows[("metadata bytes per GiB, sequential", "pmemfs-shm")]["median"] > 0
    assert any(m.startswith("remount after kill -9") for m, _ in rows)
    assert any(m.startswith("daemon anon memory, after ls -lR") for m, _ in rows)
    direct = rows[("direct-access copy", "pmemfs-shm")]
    assert direct["runs"] and direct["runs"][0] > 0, direct  # pmemfs.direct exists: it must run
    assert not [n for n in data["notes"] if " failed" in n], data["notes"]
    text = md.read_text()
    assert "| metric |" in text and "| workload | target | ops | requests/op | by kind |" in text
    assert "x passthrough_ll" in r.stdout and "requests/op" in r.stdout
    # Only this run's leftovers count (another benchmark may run meanwhile): its workdir.
    base = re.search(r"workdir (/tmp/pmemfs-bench-\S+)", r.stderr).group(1)
    tag = os.path.basename(base)
    assert not {mp for mp in _mounts() - mounts_before if mp.startswith(base + "/")}, \
        "the harness left a mount behind"
    assert not {p for p in os.listdir("/dev/shm") if p.startswith(tag)} - shm_before
    assert not os.path.exists(base), "the harness left its workdir behind"


@pytest.mark.parametrize("argv, says", [
    (["--targets", "pmemfs-shm,nosuch"], "unknown target(s) nosuch"),
    (["--pmemfs", "noeq"], "expected NAME=OPTIONS"),
    (["--pmemfs", "pmemfs-shm=prefault"], "a new NAME"),
])
def test_bench_bad_targets_are_one_line(argv, says):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), *argv],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_request_lines_are_counted_by_kind(tmp_path):
    log = tmp_path / "req.log"
    log.write_text(
        "2026-12-01 10:00:00,000 12 pmemfs.fuse DEBUG write(3, 0, b'xx'...) -> ok\n"
        "2026-12-01 10:00:00,001 12 pmemfs.fuse DEBUG getxattr(3, b'security.capability') -> ENODATA\n"
        "2026-12-01 10:00:00,002 12 pmemfs.supervisor DEBUG connection(1) -> ok\n"
        "unique: 8, opcode: WRITE (16), nodeid: 2, insize: 4176, pid: 99\n"
        "unique: 9, opcode: FLUSH (25), nodeid: 2, insize: 64, pid: 99\n"
        "unique: 10, opcode: BATCH_FORGET (42), nodeid: 0, insize: 56, pid: 0\n")
    assert requests_in(str(log), 0, PMEMFS_LINE) == {"write": 1, "getxattr": 1}
    assert requests_in(str(log), 0, LIBFUSE_LINE) == {"write": 1}
    assert requests_in(str(log), log.read_text().index("unique: 9"), LIBFUSE_LINE) == {}
