"""pmemfs@.service: systemd-analyze accepts it, and its commands do what systemd expects.

systemd is not PID 1 in this container (nor on CI), so the unit cannot be started by
systemd itself. Two things stand in for that: `systemd-analyze verify` (it runs
without a manager; --man=no and --generators=no because it needs neither man pages nor
the generators, which want a booted system), and a small runner below that does what
systemd does for this unit: reads the EnvironmentFile, runs ExecStartPre and ExecStart
with a NOTIFY_SOCKET, waits for READY=1, and stops the service with SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from conftest import assert_clean, new_region_path

from pmemfs import mounting, systemd

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


def _service_commands(unit: str, env: dict[str, str]) -> list[list[str]]:
    """ExecStartPre... then ExecStart, with systemd's ${VAR}/$VAR/$$ substitution."""

    def substitute(word: str) -> list[str]:
        if re.fullmatch(r"\$\{(\w+)\}", word):  # one word, even when empty
            return [env.get(word[2:-1], "")]
        if re.fullmatch(r"\$(\w+)", word):  # split into words, dropped when empty
            return env.get(word[1:], "").split()
        return [re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word).replace("$$", "$")]

    cmds = []
    for line in unit.splitlines():
        key, _, value = line.partition("=")
        if key in ("ExecStartPre", "ExecStart"):
            cmds.append([w for word in shlex.split(value) for w in substitute(word)])
    return cmds


def _environment(unit: str, conf: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in unit.splitlines():
        if line.startswith("Environment="):
            for item in shlex.split(line[len("Environment="):]):
                k, _, v = item.partition("=")
                env[k] = v
    for line in conf.splitlines():  # EnvironmentFile= overrides Environment=
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            env[k] = v
    return env


def test_service_starts_notifies_ready_and_stops_clean(tmp_path):
    """Run the unit's own commands the way systemd would, on a region it has to create."""
    region = new_region_path()
    mp = tmp_path / "pmem" / "vm"  # missing: ExecStartPre makes it
    assert pmemfs("systemd-unit", "--install", "--root", str(tmp_path), "--instance", "t",
                  "--region", region, "--mountpoint", str(mp), "--create-size", "64M").returncode == 0
    unit = (tmp_path / systemd.UNIT_DIR / systemd.UNIT_NAME).read_text()
    env = _environment(unit, (tmp_path / systemd.CONF_DIR / "t.conf").read_text())
    *pre, start = _service_commands(unit, env)
    notify_path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(60)
    proc = None
    try:
        for cmd in pre:
            r = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, (cmd, r.stderr)
        assert mp.is_dir() and os.path.getsize(region) == 64 << 20  # made by ExecStartPre
        proc = subprocess.Popen(start, env={**os.environ, **env, "NOTIFY_SOCKET": notify_path},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg.splitlines(), msg
        # Ready means ready: the mount answers at once (a unit After= it may use it now).
        assert mounting.pmemfs_mount_at(str(mp)) is not None
        os.statvfs(mp)
        (mp / "guest-ram").write_bytes(b"x" * 4096)
        proc.send_signal(signal.SIGTERM)  # what systemctl stop sends
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        assert mounting.pmemfs_mount_at(str(mp)) is None
        assert mounting.region_holder(region) is None
        assert_clean(region)
        assert "Traceback" not in proc.stderr.read()
        # A second start finds the region and does not make it again.
        for cmd in pre:
            assert subprocess.run(cmd, env={**os.environ, **env}, timeout=120).returncode == 0
        r = pmemfs("info", "--json", region)
        assert json.loads(r.stdout)["files"] == 1, r.stdout  # the file written above is still there
    finally:
        sock.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounting.pmemfs_mount_at(str(mp)):
            subprocess.run(["fusermount3", "-uz", str(mp)])
        if os.path.exists(region):
            os.unlink(region)
