"""tools/soak.py: the suite's short soak (every phase once, small sizes), its report, its
stop at the first problem with the seed to replay, and its cleanup, also when killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import wait_for

from pmemfs.serve import mounting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOAK = os.path.join(ROOT, "tools", "soak.py")
PHASES = ["fsx", "churn", "kill", "damage", "enospc"]


def soak(tmp_path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SOAK, "--workdir", str(tmp_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def dirs_of(out: str) -> tuple[str, str]:
    m = re.search(r"mounts in (\S+), regions in (\S+);", out)
    assert m, out[:500]
    return m.group(1), m.group(2)


def leftovers(work: str, shm: str) -> list[str]:
    """Whatever the soak left: mounts under its directory, its directories, processes
    serving its regions."""
    out = [f"mount {m.mountpoint}" for m in mounting.mounts() if m.mountpoint.startswith(work)]
    out += [f"directory {d}" for d in (work, shm) if os.path.exists(d)]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if shm.encode() in f.read():
                    out.append(f"process {pid}")
        except OSError:
            pass
    return out


def test_a_short_soak_runs_every_phase_and_cleans_up(tmp_path):
    report = tmp_path / "report.json"
    p = soak(tmp_path, "--small", "--rounds", "5", "--seed", "11", "--json", str(report))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, out[-4000:] + err[-2000:]
    lines = out.splitlines()
    rounds = [line for line in lines if line.startswith("round ")]
    assert [line.split()[2] for line in rounds] == PHASES and all(" ok " in line for line in rounds), out
    assert lines[-1].startswith("soak: 5 rounds") and "0 problem(s)" in lines[-1]
    rep = json.loads(report.read_text())
    assert rep["problems"] == 0 and rep["status"] == 0 and rep["machine"]["cpus"] == os.cpu_count()
    assert [(r["phase"], r["seed"], r["result"]) for r in rep["rounds"]] == \
        [(ph, 11 + i, "ok") for i, ph in enumerate(PHASES)]
    n = {r["phase"]: r["numbers"] for r in rep["rounds"]}
    assert n["fsx"]["reads"] > 20 and n["fsx"]["kills"] == 1
    assert n["churn"]["ops"] > 100 and n["churn"]["shared"] > 0
    assert n["kill"]["kills"] + n["kill"]["upgrades"] == 2
    assert n["damage"]["seeds"] == 6 and n["damage"]["fuse_mounts"] == 1
    assert n["enospc"]["cycles"] == 2 and all(x > 0 for x in n["enospc"]["stored_mib"])
    assert not leftovers(rep["work_dir"], rep["shm_dir"])


def test_a_problem_stops_the_soak_with_its_seed_and_cleans_up(tmp_path):
    """--inject-fault changes a byte behind the fsx model: the first round must report it
    (what, where, the seed, the command to replay), no later round runs, exit status 1."""
    report = tmp_path / "report.json"
    p = soak(tmp_path, "--small", "--phases", "fsx,churn", "--rounds", "2", "--seed", "5", "--inject-fault",
             "--json", str(report))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 1, out[-4000:] + err[-2000:]
    problem = [line for line in out.splitlines() if line.startswith("round ")]
    assert len(problem) == 1 and "fsx     seed 5" in problem[0] and "PROBLEM" in problem[0]
    assert "whole-file read" in problem[0] and "first difference at" in problem[0]
    assert "replay: python tools/soak.py --phases fsx --seed 5 --rounds 1 --small --inject-fault" in out
    rep = json.loads(report.read_text())
    assert rep["problems"] == 1 and rep["problem"]["seed"] == 5 and len(rep["rounds"]) == 1
    assert not leftovers(rep["work_dir"], rep["shm_dir"])


def test_sigterm_mid_round_cleans_up(tmp_path):
    p = soak(tmp_path, "--small", "--phases", "kill", "--rounds", "1")
    header = p.stdout.readline()
    work, shm = dirs_of(header)
    try:
        assert wait_for(lambda: any(m.mountpoint.startswith(work) for m in mounting.mounts()), 60)
        time.sleep(1)  # the clients are running
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, header + out + err
    assert "interrupted" in out and "Traceback" not in err, out + err
    assert wait_for(lambda: not leftovers(work, shm), 10), leftovers(work, shm)


def test_a_usage_error_is_one_line():
    r = subprocess.run([sys.executable, SOAK, "--phases", "fsx,nope"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("soak.py: error:"), r.stderr
    r = subprocess.run([sys.executable, SOAK, "--rounds", "1", "--workdir", "/nonexistent/soak"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == "soak.py: --workdir /nonexistent/soak: no such directory\n", r.stderr
