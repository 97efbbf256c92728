"""A real QEMU guest on pmemfs: QEMU itself, QMP, its serial console, and the QEMU
halves of the flows (CPR save and restore, live migration); its image is _vm_image.py.

Shared by examples/vm_live_update.py and tests/test_vm.py. The guest is the Debian
kernel from /boot with an initramfs holding one static program (vm_guest.c) that
fills most of guest RAM with a pattern and verifies it forever, printing a tick line
on the serial console. Guest RAM is a `memory-backend-file,share=on` on a pmemfs
mount. TCG only: KVM is not usable on this kind of machine (the guest hangs in the
BIOS), and TCG is what CI has anyway.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

# The guest's image and what the machine needs: a module of its own, its names kept here
# too (tests/test_vm.py and examples/vm_live_update.py use _vm.missing, _vm.VMError).
from _vm_image import QEMU, VMError, build_initramfs, find_kernel, guest_modules, missing  # noqa: F401

MIGRATE_BANDWIDTH = 8 << 30  # bytes/s: no cap on one machine
# QEMU 7.2's TCG loses guest writes during live migration: the fast path of its
# dirty-bitmap sync (taken for a RAM block whose length is a multiple of 64 pages)
# clears the bits without resetting the TCG TLB, so a page that stays in the TLB is
# then written untracked and never sent again (fixed upstream in QEMU 9.0 by 03bfc2188f
# "physmem: Fix migration dirty bitmap coherency with TCG memory access"). Our guest saw
# it as a page one generation old, or a kernel panic, after half of the precopy runs,
# with tmpfs as well as pmemfs. Two workarounds:
# - guest RAM is TCG_RAM_PAD longer than asked (backend_size), so its length is not a
#   multiple of 64 pages and every sync takes the slow path, which resets the TLB;
# - pti=on although the CPU model needs no PTI: every kernel entry switches CR3, which
#   flushes TCG's TLB (alone it narrowed the window but did not close it: CI saw one
#   stale page in a migration with it). mitigations=off keeps the rest fast.
TCG_RAM_PAD = 8 << 10  # QEMU rounds -m up to 8 KiB; 64 pages are 256 KiB


def backend_size(ram: int) -> int:
    """The size of the memory backend (and the file) for a guest asked to have ram bytes."""
    return ram + TCG_RAM_PAD if ram % (256 << 10) == 0 else -(-ram // 8192) * 8192


KERNEL_CMDLINE = "console=ttyS0 quiet mitigations=off pti=on panic=-1"
TICK = re.compile(r"^vmcheck tick=(\d+) gen=(\d+) swept_mib=(\d+) mismatches=(\d+) "
                  r"stall_ms=([\d.]+) stall_max_ms=([\d.]+) up_ms=(\d+)\s*$")


# ------------------------------------------------------------------ QMP
class QMPError(VMError):
    pass


class QMP:
    """A QMP client over a unix socket: commands in order, events kept for whoever asks."""

    def __init__(self, path: str, timeout: float = 60.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb", buffering=0)
        self.events: list[dict] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise QMPError("QEMU closed the QMP socket")
        return json.loads(line)

    def cmd(self, name: str, **args) -> object:
        msg = {"execute": name, **({"arguments": args} if args else {})}
        self.file.write(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QMPError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------------------------ the serial console
@dataclass
class Tick:
    tick: int
    gen: int
    swept_mib: int
    mismatches: int
    stall_ms: float
    stall_max_ms: float
    up_ms: int


@dataclass
class Console:
    """What the guest printed, parsed."""

    text: str
    ticks: list[Tick] = field(default_factory=list)
    mismatch_lines: list[str] = field(default_factory=list)
    ready: bool = False
    fatal: str = ""

    @classmethod
    def parse(cls, text: str) -> Console:
        c = cls(text)
        for line in text.splitlines():
            m = TICK.match(line.strip())
            if m:
                g = m.groups()
                c.ticks.append(Tick(int(g[0]), int(g[1]), int(g[2]), int(g[3]), float(g[4]), float(g[5]), int(g[6])))
            elif "vmcheck: MISMATCH" in line:
                c.mismatch_lines.append(line.strip())
            elif "vmcheck: ready" in line:
                c.ready = True
            elif "vmcheck: FATAL" in line or "Kernel panic" in line:
                c.fatal = c.fatal or line.strip()
        return c

    @property
    def last(self) -> Tick | None:
        return self.ticks[-1] if self.ticks else None


# ------------------------------------------------------------------ QEMU
@dataclass
class Guest:
    """What a guest is made of; the same for every QEMU that runs it (source and destination)."""

    ram_size: int  # bytes asked for; the memory backend and -m are backend_size
    check_mib: int  # guest RAM the verifier takes
    tick_ms: int = 250
    kernel: str = ""
    initramfs: str = ""
    # Free page reporting: a virtio-balloon device, and the guest gives back the last
    # give_back_mib of its memory after tick give_back_tick (vm_guest.c).
    balloon: bool = False
    give_back_mib: int = 0
    give_back_tick: int = 0

    def __post_init__(self) -> None:
        self.kernel = self.kernel or find_kernel() or ""
        if not self.kernel:
            raise VMError("no kernel: install linux-image-amd64 or set PMEMFS_VM_KERNEL")
        self.initramfs = self.initramfs or build_initramfs(kernel=self.kernel)
        if self.balloon and not guest_modules(self.kernel):
            raise VMError(f"no virtio-balloon modules for {self.kernel} under /lib/modules")

    @property
    def backend_size(self) -> int:
        return backend_size(self.ram_size)


class Qemu:
    """One QEMU process running (or about to receive) the guest, RAM in ram_path.

    ram_path is opened with share=on: guest RAM is the file's MAP_SHARED page cache,
    so what the guest writes reaches pmemfs (and survives QEMU), and the migration
    capability x-ignore-shared can leave it out of the stream.
    """

    def __init__(self, guest: Guest, ram_path: str | None, workdir: str, name: str,
                 incoming: bool = False, paused: bool = False):
        self.guest = guest
        self.ram_path = ram_path  # None: anonymous RAM (memory-backend-ram), for probes
        self.paused = paused  # -S: the CPU never starts
        self.name = name
        self.serial = os.path.join(workdir, f"{name}.serial")
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        self.stderr_path = os.path.join(workdir, f"{name}.stderr")
        self.incoming = incoming
        self.qmp: QMP | None = None
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        g = self.guest
        if self.ram_path is None:
            mem = f"memory-backend-ram,id=ram0,size={g.backend_size}"
        else:
            mem = f"memory-backend-file,id=ram0,size={g.backend_size},mem-path={self.ram_path},share=on"

        return [
            QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-accel", "tcg",
            "-machine", "pc,memory-backend=ram0", "-m", f"{g.backend_size >> 10}K", "-smp", "1",
            "-object", mem,
            "-kernel", g.kernel, "-initrd", g.initramfs,
            "-append", f"{KERNEL_CMDLINE} -- {g.check_mib} {g.tick_ms} {g.give_back_mib} {g.give_back_tick}",
            *(["-device", "virtio-balloon-pci,free-page-reporting=on"] if g.balloon else []),
            "-chardev", f"file,id=ser0,path={self.serial}", "-serial", "chardev:ser0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off", "-no-reboot",
            *(["-incoming", "defer"] if self.incoming else []), *(["-S"] if self.paused else []),
        ]

    def start(self, timeout: float = 60.0) -> Qemu:
        for p in (self.qmp_path, self.serial):
            if os.path.exists(p):
                os.unlink(p)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise VMError(f"{self.name}: QEMU exited with {self.proc.returncode}: {self.stderr()}")
            try:
                self.qmp = QMP(self.qmp_path)
                return self
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise VMError(f"{self.name}: no QMP socket after {timeout:.0f} s") from None
                time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr(self) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read().strip()[-2000:]
        except OSError:
            return ""

    def console(self) -> Console:
        try:
            with open(self.serial, errors="replace") as f:
                return Console.parse(f.read())
        except FileNotFoundError:
            return Console("")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> str:
        assert self.qmp is not None
        return self.qmp.cmd("query-status")["status"]

    def wait_ticks(self, after: int, timeout: float = 120.0) -> Console:
        """Until the guest prints a tick numbered above `after`."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.console()
            if c.fatal:
                raise VMError(f"{self.name}: guest failed: {c.fatal}")
            if c.last and c.last.tick > after:
                return c
            if not self.alive():
                raise VMError(f"{self.name}: QEMU died ({self.describe_exit()}); "
                              f"last tick {c.last.tick if c.last else None}; {self.stderr()}")
            if time.monotonic() > deadline:
                raise VMError(f"{self.name}: no tick after {after} within {timeout:.0f} s "
                              f"(last: {c.last}); console tail: {c.text[-300:]!r}")
            time.sleep(0.05)

    def describe_exit(self) -> str:
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is None:
            return "running"
        if rc < 0:
            return f"killed by {signal.Signals(-rc).name}"
        return f"exit status {rc}"

    def wait_status(self, wanted: set[str], timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            s = self.status()
            if s in wanted:
                return s
            if time.monotonic() > deadline:
                raise VMError(f"{self.name}: still {s!r}, wanted {sorted(wanted)}")
            time.sleep(0.01)

    def quit(self, timeout: float = 30.0) -> None:
        """QMP quit and wait for the process: its exit writes the guest's dirty pages back."""
        if self.alive() and self.qmp is not None:
            try:
                self.qmp.cmd("quit")
            except (QMPError, OSError):
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.close_qmp()

    def kill(self) -> None:
        """SIGKILL, for finalizers: never leaves a QEMU behind."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.close_qmp()

    def close_qmp(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    # -------------------------------------------------------------- migration
    def set_capabilities(self, **caps: bool) -> None:
        assert self.qmp is not None
        self.qmp.cmd("migrate-set-capabilities", capabilities=[
            {"capability": name.replace("_", "-"), "state": on} for name, on in caps.items()])

    def wait_migration(self, timeout: float = 120.0, until_bytes: int = 0) -> dict:
        """Poll query-migrate on the source until it completes (or, with until_bytes,
        has sent that much); returns its statistics."""
        assert self.qmp is not None
        deadline = time.monotonic() + timeout
        while True:
            info = self.qmp.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if until_bytes and info.get("ram", {}).get("transferred", 0) >= until_bytes:
                return info
            if status in ("failed", "cancelled"):
                raise VMError(f"{self.name}: migration {status}: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise VMError(f"{self.name}: migration still {status} after {timeout:.0f} s")
            time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the flows' QEMU halves
@dataclass
class CprSave:
    state_path: str
    state_bytes: int
    stopped_at: float  # time.monotonic() of the QMP stop
    last_tick: int
    migrate_info: dict


def cpr_save(vm: Qemu, state_path: str) -> CprSave:
    """Cooperative restore, first half: stop, save device state only (x-ignore-shared), quit."""
    assert vm.qmp is not None
    stopped_at = time.monotonic()
    vm.qmp.cmd("stop")
    vm.set_capabilities(x_ignore_shared=True)
    vm.qmp.cmd("migrate", uri=f"exec:cat > {state_path}")
    info = vm.wait_migration()
    last = vm.console().last
    vm.quit()
    return CprSave(state_path, os.path.getsize(state_path), stopped_at, last.tick if last else 0, info)


def cpr_restore(guest: Guest, ram_path: str, workdir: str, name: str, state_path: str) -> Qemu:
    """Second half: a new QEMU on the same RAM file, -incoming defer, load the state, cont."""
    vm = Qemu(guest, ram_path, workdir, name, incoming=True).start()
    assert vm.qmp is not None
    vm.set_capabilities(x_ignore_shared=True)
    vm.qmp.cmd("migrate-incoming", uri=f"exec:cat {state_path}")
    vm.wait_status({"paused", "running"})  # "inmigrate" until the state is loaded
    vm.qmp.cmd("cont")
    return vm


def live_migrate(src: Qemu, guest: Guest, dst_ram: str, workdir: str, name: str,
                 postcopy: bool = False, dst_timeout: float = 60.0) -> tuple[Qemu, dict]:
    """QEMU's own migration to a new QEMU whose RAM is dst_ram, over TCP on this machine."""
    assert src.qmp is not None
    ends = "running" if src.status() == "running" else "paused"  # the destination follows the source
    dst = Qemu(guest, dst_ram, workdir, name, incoming=True).start()
    assert dst.qmp is not None
    try:
        # A guest restored by CPR still has x-ignore-shared on; to another host its RAM
        # must be in the stream (with it on, the destination would run on its own file).
        src.set_capabilities(x_ignore_shared=False, postcopy_ram=postcopy)
        if postcopy:
            dst.set_capabilities(postcopy_ram=True)
        # QEMU's default cap (128 MiB/s) is below the rate at which the verifier
        # rewrites its memory (~0.5 GB/s under TCG): precopy would never converge.
        # Auto-converge throttles the vCPU if it still does not.
        src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": MIGRATE_BANDWIDTH})
        src.set_capabilities(auto_converge=True)
        port = free_port()
        dst.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        if postcopy:
            # Switch over once precopy is under way, not at once: a destination that
            # refuses postcopy does so at the start (POSTCOPY_ADVISE), and a source that
            # has not yet switched is left running and able to migrate again.
            src.wait_migration(until_bytes=guest.ram_size // 4)
            src.qmp.cmd("migrate-start-postcopy")
        info = src.wait_migration()
        dst.wait_status({ends}, timeout=dst_timeout)
    except BaseException:
        dst.kill()
        raise
    return dst, info


def postcopy_probe(guest: Guest, dst_ram: str, workdir: str) -> str:
    """Try a postcopy migration into dst_ram; returns how the destination failed.

    The source is a throwaway QEMU (anonymous RAM, never started): a QEMU 7.2 source
    whose postcopy attempt was refused failed its next precopy now and then (the
    destination reported EIO loading RAM; seen with a tmpfs destination as well), so
    the real guest is not used for the attempt. Raises VMError if postcopy worked.

    Before pmemfs had fallocate, QEMU's destination stopped at once ("Failed to
    fallocate", it discards its RAM first). Now it gets further and then never runs:
    the source reports the migration completed, the destination stays in prelaunch,
    waiting for pages it cannot fault in (userfaultfd refuses a FUSE shared mapping:
    tests/test_vm.py checks that directly). So it is given 8 s, not a minute.
    """
    src = Qemu(guest, None, workdir, "postcopy-probe-src", paused=True).start()
    dst: Qemu | None = None
    try:
        dst, _ = live_migrate(src, guest, dst_ram, workdir, "postcopy-probe-dst", postcopy=True,
                              dst_timeout=8.0)
    except VMError as e:
        with open(os.path.join(workdir, "postcopy-probe-dst.stderr"), errors="replace") as f:
            return " | ".join(line.strip() for line in f if line.strip()) or str(e)
    finally:
        src.kill()
        if dst is not None:
            dst.kill()
    raise VMError("postcopy into a pmemfs file worked: the README says it is refused; update it")
