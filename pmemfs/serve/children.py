"""A daemon as the supervisor sees it: a child process (standby or serving) started with
the connection's /dev/fuse descriptor and a socket, over which it says "ready", "ok ...",
"drained" and hears "go", "drain", "remount ...". Standard library only.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time

from .mountctl import SupervisorError

EXIT_HANDED_OVER = 75  # a daemon that drained for a successor exits with this


class DiedEarly(SupervisorError):
    """A standby closed its socket without a word: it died (a signal, a crash)."""


class Child:
    """A daemon process (standby or serving) and the socket we talk to it over."""

    def __init__(self, cmd: list[str], fuse_fd: int, env: dict | None = None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        os.set_inheritable(theirs.fileno(), True)
        self.proc = subprocess.Popen(
            [*cmd, "--fuse-fd", str(fuse_fd), "--ctl-fd", str(theirs.fileno())],
            pass_fds=(fuse_fd, theirs.fileno()), stdin=subprocess.DEVNULL, cwd="/", env=env,
            start_new_session=False)
        theirs.close()
        self.sock = ours
        self.buf = b""
        self.started = time.monotonic()
        self.ready = False  # a standby that said "ready"
        self.serving_since: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        try:
            self.sock.sendall(line.encode() + b"\n")
        except OSError:
            pass  # it died; its exit is noticed by the caller

    def read_line(self, timeout: float) -> str | None:
        """Next line from the child; "" when it closed the socket, None on timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = max(0.0, deadline - time.monotonic())
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                return None
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                return ""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.sock.close()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
