"""Access to the libfuse session behind pyfuse3, for what pyfuse3 does not expose.

pyfuse3 keeps its `struct fuse_session *` in a module-level C variable and offers no
way to reach it. pmemfs needs it for one thing: to serve a FUSE connection that an
earlier daemon already initialised (live update, docs/DESIGN.md "Live update").

The kernel sends FUSE_INIT once per connection, and a fresh libfuse session answers
every request with EIO until it has seen an INIT. The supervisor keeps the INIT
request the kernel sent at mount time, and each new daemon feeds those exact bytes to
its own session with libfuse's public `fuse_session_process_buf`. libfuse then
negotiates exactly what it negotiated the first time (same kernel flags, same
options, same code), sets its private state (got_init, conn, bufsize) itself, and
writes an INIT reply whose request id the kernel no longer knows; the kernel answers
that write with ENOENT, which libfuse ignores by design (it is what an interrupted
request gets). No private structure is read or written, so nothing here depends on
libfuse's internal layout for the takeover. What it depends on is found and checked
before use:

- the address of pyfuse3's `session` variable, from the symbol table of pyfuse3's
  shared object (it is built from source and not stripped), checked by asking
  libfuse for the session's fd and comparing it with the fd pyfuse3 was given;
- FUSE_NOTIFY_RESEND (kernel 6.9+), which moves the requests a dead daemon had read
  but not answered back to the queue; refused with EINVAL by older kernels.

The second use is handlers pyfuse3 does not have (fallocate, lseek, ioctl): libfuse
dispatches each request through the copy of the operations table it keeps in the
session, and pyfuse3 leaves those slots NULL. `install_operations` finds that copy
without knowing the session's layout: it is byte for byte pyfuse3's own `fuse_ops`
table (another symbol of pyfuse3's object), so it searches the session for those bytes,
checks that the match is unique and that the slots it fills are still NULL, and only
then writes the function pointers. Anything unexpected leaves the session untouched.
The same table's `init` slot is wrapped (pyfuse3's own init runs first) when the
daemon needs to ask for capabilities pyfuse3 does not know (FUSE_DONT_MASK).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import struct
from collections.abc import Callable

FUSE_NOTIFY_RESEND = 7
FUSE_INIT = 26
IN_HEADER = struct.Struct("<IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
# The kernel lets the server clear set-uid/set-gid itself and stops asking for
# security.capability before every write once an inode is known clean (SB_NOSEC).
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
SESSION_SYMBOL = b"__pyx_v_7pyfuse3_session"
OPS_SYMBOL = b"__pyx_v_7pyfuse3_fuse_ops"
# struct fuse_lowlevel_ops of libfuse 3.x: 44 function pointers; the slots we fill.
OPS_SLOTS = 44
OPS_INDEX = {"init": 0, "ioctl": 34, "fallocate": 40, "lseek": 43}
FUSE_CAP_DONT_MASK = 1 << 6
FUSE_CAP_POSIX_ACL = 1 << 19
FUSE_CAP_WRITEBACK_CACHE = 1 << 16


class SessionError(Exception):
    """The running libfuse/pyfuse3 cannot take over a connection; one line for a person."""


class _FuseBuf(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_long)]


def elf_symbol(path: str, name: bytes) -> int:
    """Value (offset from the load base) of a symbol in an ELF64 object's .symtab."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SessionError(f"{path}: not a little-endian ELF64 object")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for sh in sections:
        if sh[1] != 2:  # SHT_SYMTAB
            continue
        strtab = sections[sh[6]]
        str_off = strtab[4]
        for pos in range(sh[4], sh[4] + sh[5], 24):
            st_name, _info, _other, _shndx, st_value, _size = struct.unpack_from("<IBBHQQ", data, pos)
            end = data.index(b"\0", str_off + st_name)
            if data[str_off + st_name:end] == name:
                return st_value
    raise SessionError(f"{path}: no symbol {name.decode()} (stripped, or another pyfuse3 version)")


def _load_base(path: str) -> int:
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    raise SessionError(f"{path} is not mapped into this process")


@functools.cache
def _libfuse() -> ctypes.PyDLL:
    # PyDLL keeps the GIL across the call: process_buf calls back into pyfuse3's
    # handlers, which run Python code. The soname first: find_library runs ldconfig.
    try:
        lib = ctypes.PyDLL("libfuse3.so.3")
    except OSError:
        lib = ctypes.PyDLL(ctypes.util.find_library("fuse3"))
    lib.fuse_session_fd.argtypes = [ctypes.c_void_p]
    lib.fuse_session_fd.restype = ctypes.c_int
    lib.fuse_session_process_buf.argtypes = [ctypes.c_void_p, ctypes.POINTER(_FuseBuf)]
    lib.fuse_session_process_buf.restype = None
    lib.fuse_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.fuse_reply_err.restype = ctypes.c_int
    lib.fuse_reply_lseek.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.fuse_reply_lseek.restype = ctypes.c_int
    lib.fuse_reply_ioctl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.fuse_reply_ioctl.restype = ctypes.c_int
    lib.fuse_req_ctx.argtypes = [ctypes.c_void_p]
    lib.fuse_req_ctx.restype = ctypes.POINTER(RequestContext)
    return lib


class RequestContext(ctypes.Structure):
    """struct fuse_ctx: who sent the request."""

    _fields_ = [("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("pid", ctypes.c_int32),
                ("umask", ctypes.c_uint32)]


class FileInfo(ctypes.Structure):
    """struct fuse_file_info of libfuse 3.x, as far as fh."""

    _fields_ = [("flags", ctypes.c_int), ("bits", ctypes.c_uint), ("padding2", ctypes.c_uint),
                ("fh", ctypes.c_uint64)]


class ConnInfo(ctypes.Structure):
    """struct fuse_conn_info of libfuse 3.x (fuse_common.h), as far as `want`."""

    _fields_ = [("proto_major", ctypes.c_uint), ("proto_minor", ctypes.c_uint),
                ("max_write", ctypes.c_uint), ("max_read", ctypes.c_uint),
                ("max_readahead", ctypes.c_uint), ("capable", ctypes.c_uint), ("want", ctypes.c_uint)]


# The C signatures of the handlers we add (fuse_lowlevel.h).
FALLOCATE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64,
                             ctypes.c_int64, ctypes.POINTER(FileInfo))
LSEEK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int,
                         ctypes.POINTER(FileInfo))
# ioctl: `unsigned int cmd` from FUSE_USE_VERSION 35 on (int before: the same bits).
IOCTL = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint, ctypes.c_void_p,
                         ctypes.POINTER(FileInfo), ctypes.c_uint, ctypes.c_void_p, ctypes.c_size_t,
                         ctypes.c_size_t)
INIT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ConnInfo))
# pyfuse3's own init, called from ours: it runs Python code, so the GIL must stay held.
_PY_INIT = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ConnInfo))
_installed: list = []  # the C callbacks must live as long as the session


@functools.cache
def locate() -> int:
    """Address of pyfuse3's `session` variable (the pointer's home, not the pointer)."""
    import pyfuse3

    so = pyfuse3.__file__
    return _load_base(so) + elf_symbol(so, SESSION_SYMBOL)


def session_pointer() -> int:
    """The current `struct fuse_session *` of pyfuse3 (0 before pyfuse3.init)."""
    return ctypes.c_void_p.from_address(locate()).value or 0


def check_init_request(data: bytes) -> None:
    if len(data) < IN_HEADER.size + 8:
        raise SessionError("the saved FUSE_INIT request is truncated")
    length, opcode = struct.unpack_from("<II", data)
    if opcode != FUSE_INIT or length != len(data):
        raise SessionError(f"the saved request is not a FUSE_INIT (opcode {opcode}, {length} bytes)")


def replay_init(fd: int, init_request: bytes, add_flags: int = 0) -> int:
    """Initialise pyfuse3's fresh session on `fd` with the connection's original INIT.

    Call after pyfuse3.init(ops, f"/dev/fd/{fd}") and before pyfuse3.main(). It runs
    the filesystem's init() handler, as a first INIT would.

    With `add_flags` (FUSE_INIT flags libfuse 3.14 does not know, such as
    FUSE_HANDLE_KILLPRIV_V2), libfuse's reply is caught instead of reaching the kernel,
    the flags the kernel offered among them are added, and the reply is written to the
    kernel from here. Only the first daemon of a connection does that: the kernel takes
    one INIT reply per connection, and a successor's reply is refused anyway. Returns
    the flags added.
    """
    check_init_request(init_request)
    lib = _libfuse()
    se = session_pointer()
    if not se:
        raise SessionError("pyfuse3 has no session (pyfuse3.init not called)")
    have = lib.fuse_session_fd(se)
    if have != fd:  # the symbol is not what we think it is: write nothing
        raise SessionError(f"pyfuse3's session reports fd {have}, expected {fd}: unknown layout")
    mem = ctypes.create_string_buffer(init_request, len(init_request))
    buf = _FuseBuf(len(init_request), 0, ctypes.cast(mem, ctypes.c_void_p), -1, 0)
    if not add_flags:
        lib.fuse_session_process_buf(se, ctypes.byref(buf))
        return 0
    reply = _caught_reply(fd, lambda: lib.fuse_session_process_buf(se, ctypes.byref(buf)))
    patched, added = add_init_flags(init_request, reply, add_flags)
    os.write(fd, patched)
    return added


def _caught_reply(fd: int, process: Callable[[], None]) -> bytes:
    """What libfuse writes to `fd` while `process` runs, caught in a pipe: the fd number
    points at the pipe meanwhile (nothing else uses it before pyfuse3.main runs)."""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    saved = os.dup(fd)
    inheritable = os.get_inheritable(fd)
    try:
        os.dup2(w, fd, inheritable=inheritable)
        try:
            process()
        finally:
            os.dup2(saved, fd, inheritable=inheritable)
        try:
            return os.read(r, 1 << 16)
        except BlockingIOError:
            raise SessionError("libfuse wrote no reply to FUSE_INIT") from None
    finally:
        for x in (r, w, saved):
            os.close(x)


def add_init_flags(request: bytes, reply: bytes, add_flags: int) -> tuple[bytes, int]:
    """`reply` (a struct fuse_init_out after its header) with those of `add_flags` that
    the kernel offered in `request` added; an error reply is left as it is."""
    length, error, unique = OUT_HEADER.unpack_from(reply)
    if length != len(reply) or unique != IN_HEADER.unpack_from(request)[2]:
        raise SessionError("libfuse's INIT reply is not one (unknown layout)")
    if error or len(reply) < OUT_HEADER.size + 16:
        return reply, 0
    offered = struct.unpack_from("<I", request, IN_HEADER.size + 12)[0]
    flags = struct.unpack_from("<I", reply, OUT_HEADER.size + 12)[0]
    added = add_flags & offered & ~flags
    out = bytearray(reply)
    struct.pack_into("<I", out, OUT_HEADER.size + 12, flags | added)
    return bytes(out), added


def notify_resend(fd: int) -> None:
    """Ask the kernel to queue again every request read from `fd`'s connection but not
    answered (those a dead daemon had taken). Raises SessionError when unsupported."""
    try:
        os.write(fd, struct.pack("<IiQ", 16, FUSE_NOTIFY_RESEND, 0))
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS):
            raise SessionError("this kernel has no FUSE_NOTIFY_RESEND (needs Linux 6.9 or later)") from None
        raise


def kernel_has_resend(release: str | None = None) -> bool:
    """FUSE_NOTIFY_RESEND exists from Linux 6.9 on (commit 760eac73f9f6)."""
    release = release or os.uname().release
    try:
        major, minor = (int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 9)


def takeover_unavailable() -> str | None:
    """Why a connection could not be handed to a new daemon here, or None if it can.

    Cheap and import-free where possible: the supervisor asks before it mounts.
    """
    if not kernel_has_resend():
        return f"kernel {os.uname().release} has no FUSE_NOTIFY_RESEND (needs 6.9 or later)"
    import importlib.util

    spec = importlib.util.find_spec("pyfuse3")
    if spec is None or not spec.origin:
        return "pyfuse3 is not installed"
    try:
        elf_symbol(spec.origin, SESSION_SYMBOL)
    except (OSError, SessionError) as e:
        return str(e)
    return None


# ------------------------------------------------------------ extra handlers
def _ops_table() -> bytes:
    """pyfuse3's own `fuse_ops` table, as libfuse copied it into the session."""
    import pyfuse3

    so = pyfuse3.__file__
    address = _load_base(so) + elf_symbol(so, OPS_SYMBOL)
    return ctypes.string_at(address, OPS_SLOTS * 8)


def find_session_ops(se: int, search: int = 4096) -> int:
    """Address of the session's copy of the operations table (see the module's doc)."""
    table = _ops_table()
    if table.count(b"\0" * 8) == OPS_SLOTS:
        raise SessionError("pyfuse3's operations table is empty: pyfuse3.init not called")
    memory = ctypes.string_at(se, search)
    at = memory.find(table)
    if at < 0 or memory.find(table, at + 1) >= 0:
        raise SessionError("cannot find libfuse's copy of pyfuse3's operations (unknown layout)")
    return se + at


def install_operations(fd: int, handlers: dict[str, Callable],
                       after_init: Callable[[ConnInfo], None] | None = None) -> list[str]:
    """Give pyfuse3's session handlers it lacks: {"fallocate": f, "lseek": g, "ioctl": h}.

    fallocate(req, ino, mode, offset, length, fi), lseek(req, ino, off, whence, fi) and
    ioctl(req, ino, cmd, arg, fi, flags, in_buf, in_bufsz, out_bufsz) are called
    synchronously while libfuse processes the request, with the GIL; each must reply
    (reply_err / reply_lseek / reply_ioctl) before it returns. after_init(conn) runs
    right after pyfuse3's init handler, at FUSE_INIT, and may change conn.want. Call
    after pyfuse3.init(), once. Returns the names installed; raises SessionError and
    changes nothing otherwise.
    """
    lib = _libfuse()
    se = session_pointer()
    if not se:
        raise SessionError("pyfuse3 has no session (pyfuse3.init not called)")
    if lib.fuse_session_fd(se) != fd:
        raise SessionError("pyfuse3's session is not the one on this descriptor: unknown layout")
    ops = find_session_ops(se)
    kinds = {"fallocate": FALLOCATE, "lseek": LSEEK, "ioctl": IOCTL}
    slots = {}
    for name in handlers:
        if name not in kinds:
            raise SessionError(f"no such low-level operation {name!r}")
        slot = ctypes.c_void_p.from_address(ops + OPS_INDEX[name] * 8)
        if slot.value:
            raise SessionError(f"pyfuse3 already handles {name}: not replacing it")
        slots[name] = slot
    init_slot = ctypes.c_void_p.from_address(ops + OPS_INDEX["init"] * 8)
    if after_init is not None and not init_slot.value:
        raise SessionError("pyfuse3 has no init handler to extend: unknown layout")
    for name, fn in handlers.items():
        c_fn = kinds[name](fn)
        _installed.append(c_fn)
        slots[name].value = ctypes.cast(c_fn, ctypes.c_void_p).value
    if after_init is not None:
        original = _PY_INIT(init_slot.value)

        def init(userdata: int, conn) -> None:
            try:
                original(userdata, conn)
            finally:
                after_init(conn.contents)

        c_init = INIT(init)
        _installed.extend((original, c_init))
        init_slot.value = ctypes.cast(c_init, ctypes.c_void_p).value
    return sorted(handlers) + (["init"] if after_init else [])


def session_fd() -> int:
    """The /dev/fuse descriptor of pyfuse3's session (when pyfuse3 mounted it itself)."""
    se = session_pointer()
    if not se:
        raise SessionError("pyfuse3 has no session (pyfuse3.init not called)")
    fd = _libfuse().fuse_session_fd(se)
    try:
        if fd < 0 or os.readlink(f"/proc/self/fd/{fd}") != "/dev/fuse":
            raise SessionError(f"pyfuse3's session reports fd {fd}, which is not /dev/fuse: unknown layout")
    except OSError:
        raise SessionError(f"pyfuse3's session reports fd {fd}, which is not open: unknown layout") from None
    return fd


def reply_err(req: int, err: int) -> None:
    """Answer a request with an errno (0: success with no data)."""
    _libfuse().fuse_reply_err(req, err)


def reply_lseek(req: int, offset: int) -> None:
    _libfuse().fuse_reply_lseek(req, offset)


def reply_ioctl(req: int, data: bytes = b"") -> None:
    """Answer an ioctl with result 0 and `data` as its output."""
    buf = ctypes.create_string_buffer(data, len(data)) if data else None
    _libfuse().fuse_reply_ioctl(req, 0, buf, len(data))


def request_context(req: int) -> RequestContext:
    return _libfuse().fuse_req_ctx(req).contents
