"""pmemfs@.service: systemd-analyze accepts it, and its commands do what systemd expects.

systemd is not PID 1 in this container (nor on CI), but its user manager runs in a
private mount namespace (tests/systemd_live.py): the unit is started, restarted and
stopped by a real systemd there. `systemd-analyze verify` checks the unit as installed
for the system manager (--man=no and --generators=no: it needs neither man pages nor
the generators, which want a booted system).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import new_region_path

from pmemfs.serve import systemd

BIN = os.path.dirname(sys.executable)


def pmemfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "pmemfs"), *args], capture_output=True, text=True, timeout=120)


def verify(*units: str) -> subprocess.CompletedProcess:
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing (./run test installs systemd)"
    return subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", *units],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def root(tmp_path):
    r = pmemfs("systemd-unit", "--install", "--root", str(tmp_path), "--instance", "vm",
               "--region", "/dev/shm/vm.region", "--mountpoint", "/srv/pmem/vm", "-o", "allow_other")
    assert r.returncode == 0, r.stderr
    assert "systemctl daemon-reload && systemctl enable --now pmemfs@vm.service" in r.stdout
    return tmp_path


def test_unit_verifies_and_a_vm_unit_can_require_it(root):
    units = root / systemd.UNIT_DIR
    r = verify(str(units / "pmemfs@vm.service"))
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    # A VM unit as the README describes it: the template resolves for its instance.
    (units / "vm1.service").write_text("[Unit]\nRequires=pmemfs@vm.service\nAfter=pmemfs@vm.service\n"
                                       "[Service]\nExecStart=/bin/true\n")
    r = verify(str(units / "vm1.service"))
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr
    # ... and verify does catch a VM unit whose mount unit does not exist (the check can fail).
    (units / "vm2.service").write_text("[Unit]\nRequires=pmemfs-typo@vm.service\n"
                                       "[Service]\nExecStart=/bin/true\n")
    assert verify(str(units / "vm2.service")).returncode != 0


def test_unit_names_this_installation_and_the_instance_conf(root):
    text = (root / systemd.UNIT_DIR / systemd.UNIT_NAME).read_text()
    assert f"ExecStart={os.path.join(BIN, 'pmemfs')} mount -f " in text
    assert "Type=notify" in text and "EnvironmentFile=/etc/pmemfs/%i.conf" in text
    assert "FileDescriptorStoreMax=2" in text and "PMEMFS_UNIT=%n" in text  # restart is live
    assert "Before=libvirtd.service" in text
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text  # reload is a live upgrade
    conf = (root / systemd.CONF_DIR / "vm.conf").read_text()
    assert "REGION=/dev/shm/vm.region\nMOUNTPOINT=/srv/pmem/vm\nOPTIONS=allow_other\n" in conf


@pytest.mark.parametrize("args, words", [
    (["--instance", "a b", "--region", "/r", "--mountpoint", "/m"], "instance name"),
    (["--instance", "vm", "--region", "/r"], "go together"),
    (["--instance", "vm", "--region", "/r x", "--mountpoint", "/m"], "no spaces"),
    (["--instance", "vm", "--region", "/r", "--mountpoint", "/m", "-o", "bogus"], "unknown mount option"),
])
def test_bad_instance_definitions_are_one_line_errors(args, words, tmp_path):
    r = pmemfs("systemd-unit", "--install", "--root", str(tmp_path), *args)
    assert r.returncode == 1 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / systemd.CONF_DIR).exists()


def test_restart_and_a_supervisor_death_are_live_under_a_real_systemd(tmp_path):
    """systemd's user manager, in a private mount namespace, runs the unit: start (it
    makes the region and the mountpoint), `systemctl restart`, SIGKILL of the supervisor,
    stop. A client keeps writing through one descriptor and one shared mapping all along:
    no call fails, the mount never leaves mountinfo, nothing written is lost, and the
    stop unmounts cleanly."""
    region = new_region_path()
    driver = os.path.join(os.path.dirname(__file__), "systemd_live.py")
    # The driver mounts a tmpfs on /run/systemd inside its namespace; on a machine
    # where systemd is installed but never ran, the directory may not exist yet.
    made_run_systemd = not os.path.isdir("/run/systemd")
    if made_run_systemd:
        os.makedirs("/run/systemd")
    try:
        r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, driver,
                            str(tmp_path), region, os.path.join(BIN, "pmemfs")],
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout)
        log = report.pop("log", "")
        assert "error" not in report, (report, log)
        assert report["active"] == "active" and report["mounted"], report
        restart, kill = report["steps"]
        for step in (restart, kill):
            assert step["state"] == "active" and step["pids"][0] != step["pids"][1], step
            assert step["errors"] == [] and step["unmounted"] == 0, step
        assert kill["restarts"] == "1", kill  # Restart=on-failure brought the supervisor back
        assert report["client"]["problems"] == [] and report["client"]["writes"] > 60, report["client"]
        assert report["after_stop"] == {"state": "inactive", "mounted": False}, report
        assert report["fsck"]["code"] == 0, report["fsck"]
        # How each step went, in the service's own words: the stored connection was taken
        # twice, the first time after a drain, the second after the supervisor's death.
        assert log.count("from systemd's fd store") == 2, log
        assert "handing the mount to the next supervisor" in log, log
        # After the supervisor's SIGKILL its daemon drains, unless systemd's own SIGKILL
        # of the cgroup (KillMode=mixed, the main process being gone) comes first: then
        # the successor recovers the journal instead. Both are a takeover, checked above.
        assert ("the supervisor is gone: draining for its successor" in log
                or "mode=takeover" in log.rsplit("from systemd's fd store", 1)[1]), log
        assert "Traceback" not in log and " ERROR " not in log, log
        assert os.path.getsize(region) == 256 << 20  # made by ExecStartPre (CREATE_SIZE)
    finally:
        if os.path.exists(region):
            os.unlink(region)
        if made_run_systemd:
            os.rmdir("/run/systemd")
