"""Driver for tests/test_systemd.py: pmemfs@.service under a real systemd manager.

systemd is not PID 1 here (nor on CI), but its user manager runs: this script is
started by the test in a private mount namespace (`unshare -m`), where /run/systemd is
a fresh tmpfs with the directory that tells `systemd --user` the system was booted with
systemd. Everything the manager mounts there is gone with the namespace.

It starts the manager, installs the unit, and then, with a client holding descriptors
and a shared mapping on the mount while another thread keeps using it:
  start, `systemctl restart`, SIGKILL of the supervisor, `systemctl stop`.
It prints one JSON object with what it saw; the test judges it.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import threading
import time

from pmemfs.serve import systemd

UNIT = "pmemfs@live.service"


def sh(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.returncode}: {r.stdout} {r.stderr}".strip())
    return r


def ctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("systemctl", "--user", "--no-pager", *args, check=check)


def prop(name: str) -> str:
    return ctl("show", "-p", name, "--value", UNIT).stdout.strip()


def mounted(mp: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mp and " fuse.pmemfs " in line for line in f)


def wait(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Client(threading.Thread):
    """Keeps using the mount through one descriptor and one mapping, opened once."""

    def __init__(self, mp: str):
        super().__init__(daemon=True)
        self.mp = mp
        self.fd = os.open(os.path.join(mp, "log"), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        ram = os.open(os.path.join(mp, "ram"), os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(ram, 1 << 20)
        self.map = mmap.mmap(ram, 1 << 20, mmap.MAP_SHARED)
        os.close(ram)
        self.errors: list[str] = []
        self.unmounted = 0  # times the mount was seen missing from mountinfo
        self.writes = 0
        self.longest = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                line = f"{self.writes:08d}\n".encode()
                os.write(self.fd, line)
                self.map[(self.writes % 256) * 4096:(self.writes % 256) * 4096 + 9] = line
                os.stat(os.path.join(self.mp, "log"))
                self.writes += 1
            except OSError as e:
                self.errors.append(f"{e.strerror} after {self.writes} writes")
                time.sleep(0.1)
            self.longest = max(self.longest, time.monotonic() - t)
            if not mounted(self.mp):
                self.unmounted += 1
            time.sleep(0.005)

    def check(self) -> list[str]:
        """Read back everything through the same descriptor and mapping."""
        problems = []
        data = os.pread(self.fd, self.writes * 9 + 9, 0)
        want = b"".join(f"{i:08d}\n".encode() for i in range(self.writes))
        if data[:len(want)] != want:
            problems.append(f"log differs from what was written ({len(data)} vs {len(want)} bytes)")
        for i in range(max(0, self.writes - 256), self.writes):
            off = (i % 256) * 4096
            if self.map[off:off + 9] != f"{i:08d}\n".encode():
                problems.append(f"mapping slot {i % 256} lost write {i}")
                break
        return problems


def main() -> int:
    work, region, pmemfs_bin = sys.argv[1], sys.argv[2], sys.argv[3]
    report: dict = {"steps": []}
    sh("mount", "-t", "tmpfs", "none", "/run/systemd")
    os.makedirs("/run/systemd/system")
    runtime = os.path.join(work, "runtime")
    units = os.path.join(runtime, "systemd", "user")
    conf = os.path.join(work, "conf")
    mp = os.path.join(work, "mnt")  # made by the unit: it does not exist yet
    os.makedirs(units)
    os.makedirs(conf)
    os.chmod(runtime, 0o700)
    os.environ["XDG_RUNTIME_DIR"] = runtime
    os.environ.pop("DBUS_SESSION_BUS_ADDRESS", None)
    with open(os.path.join(units, systemd.UNIT_NAME), "w") as f:
        f.write(systemd.unit_text(conf_dir=conf))
    with open(os.path.join(conf, "live.conf"), "w") as f:
        f.write(systemd.conf_text(region, mp, create_size="256M"))
    os.makedirs(os.path.join(units, UNIT + ".d"))
    service_log = os.path.join(work, "service.log")  # there is no journal here
    with open(os.path.join(units, UNIT + ".d", "log.conf"), "w") as f:
        f.write(f"[Service]\nStandardOutput=append:{service_log}\nStandardError=append:{service_log}\n")
    with open(os.path.join(work, "manager.log"), "w") as out:
        manager = subprocess.Popen(["/lib/systemd/systemd", "--user"], stdout=out, stderr=subprocess.STDOUT)
    client = None
    try:
        wait(lambda: ctl("is-system-running", check=False).stdout.strip() in ("running", "degraded"), 60,
             "the user manager")
        ctl("start", UNIT)
        report["active"] = prop("ActiveState")
        report["mounted"] = mounted(mp)
        first = int(prop("MainPID"))
        client = Client(mp)
        client.start()
        wait(lambda: client.writes > 20, 30, "the client's first writes")

        before = client.writes
        ctl("restart", UNIT)
        wait(lambda: client.writes > before + 20, 60, "the client after the restart")
        second = int(prop("MainPID"))
        report["steps"].append({"step": "restart", "pids": [first, second], "state": prop("ActiveState"),
                                "errors": list(client.errors), "unmounted": client.unmounted})

        before = client.writes
        os.kill(second, 9)  # the supervisor dies; Restart=on-failure brings a new one
        wait(lambda: prop("MainPID") not in ("0", str(second)) and prop("ActiveState") == "active", 60,
             "the restart after a SIGKILL")
        wait(lambda: client.writes > before + 20, 60, "the client after the supervisor's death")
        third = int(prop("MainPID"))
        report["steps"].append({"step": "kill", "pids": [second, third], "state": prop("ActiveState"),
                                "restarts": prop("NRestarts"), "errors": list(client.errors),
                                "unmounted": client.unmounted})

        client.stop.set()
        client.join(30)
        report["client"] = {"writes": client.writes, "longest_call_s": round(client.longest, 3),
                            "problems": client.check(), "errors": client.errors}
        os.close(client.fd)
        client.map.close()
        ctl("stop", UNIT)
        report["after_stop"] = {"state": prop("ActiveState"), "mounted": mounted(mp)}
        fsck = sh(os.path.join(os.path.dirname(pmemfs_bin), "pmemfs-fsck"), "-n", region, check=False)
        report["fsck"] = {"code": fsck.returncode, "out": fsck.stdout[-500:]}
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}"
        report["journal"] = ctl("status", UNIT, check=False).stdout[-3000:]
    finally:
        if client is not None:
            client.stop.set()
        ctl("stop", UNIT, check=False)
        if mounted(mp):  # the stop did not unmount: fail whatever waits on it, then detach
            with open("/proc/self/mountinfo") as f:
                minors = [ln.split()[2].split(":")[1] for ln in f if ln.split()[4] == mp]
            for minor in minors:
                try:
                    with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
                        f.write("1")
                except OSError:
                    pass
            sh("umount", "-l", mp, check=False)
        manager.terminate()
        try:
            manager.wait(30)
        except subprocess.TimeoutExpired:
            manager.kill()
            manager.wait()
    with open(service_log, errors="replace") as f:
        report["log"] = f.read()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
