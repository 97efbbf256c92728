"""Smoke test of the benchmark harness: tiny sizes, one run; it must complete, leave
nothing mounted, and write the JSON rows. Timings are not asserted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, drop_caches)"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]


def _mounts() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line.split()[1] for line in f if "pmemfs-bench-" in line}


@pytest.mark.timeout(240)
def test_bench_tiny_completes(tmp_path):
    # Only what this run leaves counts: another benchmark may be running on the machine.
    mounts_before = _mounts()
    shm_before = {p for p in os.listdir("/dev/shm") if p.startswith("pmemfs-bench-")}
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--tiny", "--no-hugetlbfs",
                        "--json", str(out), "--markdown", str(md)],
                       capture_output=True, text=True, timeout=230, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {(row["metric"], row["target"]): row for row in data["rows"]}
    for metric in ("write 1 MiB, new file", "overwrite 1 MiB", "cold read 1 MiB",
                   "random read 4 KiB, cold", "create", "stat, cold dentries", "unlink"):
        for target in ("pmemfs-shm", "tmpfs", "passthrough"):
            assert rows[(metric, target)]["runs"], (metric, target)
        pm = rows[(metric, "pmemfs-shm")]
        assert pm["baselines"]["passthrough"]["ratio"] is not None
        assert pm["goal"] and pm["met"] in (True, False)
    assert rows[("metadata bytes per GiB, sequential", "pmemfs-shm")]["median"] > 0
    assert any(m.startswith("remount after kill -9") for m, _ in rows)
    assert any(m.startswith("daemon anon memory, after ls -lR") for m, _ in rows)
    direct = rows[("direct-access copy", "pmemfs-shm")]
    assert direct["runs"] and direct["runs"][0] > 0, direct  # pmemfs.direct exists: it must run
    assert not [n for n in data["notes"] if " failed" in n], data["notes"]
    assert "| metric |" in md.read_text()
    assert "x passthrough" in r.stdout
    # Only this run's leftovers count (another benchmark may run meanwhile): its workdir.
    base = re.search(r"workdir (/tmp/pmemfs-bench-\S+)", r.stderr).group(1)
    tag = os.path.basename(base)
    assert not {mp for mp in _mounts() - mounts_before if mp.startswith(base + "/")}, \
        "the harness left a mount behind"
    assert not {p for p in os.listdir("/dev/shm") if p.startswith(tag)} - shm_before
