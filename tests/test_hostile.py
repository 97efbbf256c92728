"""Hostile requests to the control channel, through a real mount.

Generated names under user.pmemfs.* and trusted.pmemfs.* (known verbs, verbs with
junk appended, random text, names at and past 255 bytes) and generated values (random
bytes, random and deeply nested JSON, well-formed requests with hostile fields:
negative, enormous and non-integer numbers, paths with NUL, '/', '..' and overlong
parts, values at and past 64 KiB) are sent with setxattr and getxattr to every kind of
inode. Every answer must be success or an errno from the list below — never EIO (the
daemon's answer to an unexpected exception) or ENOTCONN (a dead mount) — and a request
that fails must leave the tree, its contents, the free space and the kernel objects as
they were. Afterwards the daemon log has no traceback and the region passes fsck (the
mount fixture checks both).
"""

from __future__ import annotations

import errno
import json
import os

from conftest import snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmemfs.kernel import KernelObjects

MB2 = 2 << 20
ANSWERS = {errno.EINVAL, errno.E2BIG, errno.ENAMETOOLONG, errno.ERANGE, errno.ENODATA, errno.EPERM,
           errno.EOPNOTSUPP, errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.EBUSY,
           errno.ENOTEMPTY, errno.ENOSPC, errno.EISDIR, errno.EEXIST}
TARGETS = ["", "f", "g", "d", "d/h", "lnk", "fifo", ".kernel", ".kernel/obj"]
VERBS = ["carve", "prealloc", "align", "lease", "extents", "defrag", "kernel", "kernel.list", "kernel.create",
         "kernel.preserve", "kernel.unpreserve", "kernel.retrieve", "kernel.rm", "kernel.freeze",
         "kernel.unfreeze", "kernel.finish", "kernel.", ""]

_text = st.text(st.characters(min_codepoint=1, max_codepoint=0x10FFFF, blacklist_categories=("Cs",)),
                max_size=40)
tails = st.one_of(
    st.sampled_from(VERBS),
    st.tuples(st.sampled_from(VERBS), st.sampled_from(["/x", ".x", "\t", " ", "..", "/", "\x01"])).map("".join),
    _text,
    st.integers(230, 300).map(lambda n: "v" * n),  # the whole name at and past 255 bytes
)
names = st.tuples(st.sampled_from(["user.pmemfs.", "trusted.pmemfs."]), tails).map("".join)
numbers = st.one_of(
    st.integers(-(2 ** 70), 2 ** 70),
    st.sampled_from([0, 1, -1, 4096, MB2, 2 * MB2, 2 ** 31, 2 ** 32, 2 ** 53, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 10 ** 40]),
    st.floats(), st.booleans(), st.none(), _text,
)
paths = st.one_of(
    st.sampled_from(["f", "g", "/f", "./f", "../f", "d/../f", "f/", "", ".", "..", "d", "d/h", "lnk", "lnk/x",
                     "fifo", ".kernel/obj", "a\x00b", "f\x00", "n" * 256, "/".join([".."] * 2100),
                     "d/" * 2000 + "h"]),
    _text,
)
leaves = st.one_of(st.none(), st.booleans(), numbers, _text)
trees = st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(_text, c, max_size=4),
                     max_leaves=25)
def mostly(good: list, bad: st.SearchStrategy) -> st.SearchStrategy:
    """One of the good values three times in four, else anything from bad."""
    return st.integers(0, 3).flatmap(lambda n: st.sampled_from(good) if n else bad)


blocks = mostly([0, MB2, 2 * MB2], numbers)
carves = st.fixed_dictionaries({"src": paths, "offset": blocks, "length": blocks},
                               optional={"extra": leaves, "version": numbers})
creates = st.fixed_dictionaries(
    {"name": mostly(["obj", "new", ".", "..", "a/b", "", "x" * 256, "\x00", "\udc80"], paths),
     "type": mostly(["generic", "dma-buffer"], st.one_of(st.just("nope"), leaves)),
     "size": st.integers(0, 3).flatmap(lambda n: st.integers(1, 8192) if n else numbers)},
    optional={"version": st.integers(0, 3).flatmap(lambda n: st.integers(0, 2 ** 32) if n else numbers)})
sizes = st.tuples(st.one_of(numbers, st.sampled_from(["1", "4M", "2M", "1G", "8191P", "9" * 30])),
                  st.sampled_from(["", "K", "M", "G", "P", "E", ":2M", ":1G", ":3M", "::", ":", " "])
                  ).map(lambda t: f"{t[0]}{t[1]}".encode(errors="surrogateescape"))


def _dumps(v) -> bytes:
    return json.dumps(v).encode(errors="surrogatepass")


values = st.one_of(
    st.binary(max_size=600),
    trees.map(_dumps),
    carves.map(_dumps),
    creates.map(_dumps),
    sizes,
    st.sampled_from([b"rw", b"ro", b"release", b"2M", b"1G", b"", b"reclaim", b"obj", b"new", b"\x00", b" rw "]),
    st.integers(1, 70000).map(lambda n: b"[" * n),  # nesting deeper than any parser's stack
    st.sampled_from([65535, 65536, 65537, 100000]).map(lambda n: b"7" * n),  # at and past the limit
)


def _verb(prefix: str, verb: str, targets: list[str], vals) -> st.SearchStrategy:
    return st.tuples(st.sampled_from(targets), st.just(prefix + verb), vals)


# Mostly well-aimed requests (the right verb on the right inode with a value of about
# the right shape), so that the daemon's parsers are reached, plus anything at all.
def _mostly_shaped(shaped: st.SearchStrategy) -> st.SearchStrategy:
    return st.integers(0, 3).flatmap(lambda n: shaped if n else values)


# Mostly well-aimed requests (the right verb on the right inode with a value of about
# the right shape), so that the daemon's parsers are reached, plus anything at all.
# Drawn by kind first: a kind is picked evenly, whatever its strategy's complexity.
KINDS = {
    "carve": _verb("user.pmemfs.", "carve", ["g", "g", "f", "d", ""], _mostly_shaped(carves.map(_dumps))),
    "create": _verb("trusted.pmemfs.", "kernel.create", [""], _mostly_shaped(creates.map(_dumps))),
    "prealloc": _verb("user.pmemfs.", "prealloc", ["g", "f", "d/h", "d"], st.one_of(sizes, values)),
    "align": _verb("user.pmemfs.", "align", ["g", "d", "f"], st.one_of(sizes, values)),
    "lease": _verb("user.pmemfs.", "lease", ["g", "f", "d/h", "d"], values),
    "trusted": st.tuples(st.sampled_from([""] * 4 + TARGETS),
                         st.sampled_from(VERBS[6:]).map(lambda v: "trusted.pmemfs." + v), values),
    "anything": st.tuples(st.sampled_from(TARGETS), names, values),
}
requests = st.sampled_from(["carve", "carve", "create", "create", *KINDS]).flatmap(lambda k: KINDS[k])


def test_hostile_control_requests(region_factory, mount_factory):
    m = mount_factory(region_factory(size=256 << 20))
    with open(m.p("f"), "wb") as f:
        f.write(os.urandom(3 * MB2))
    open(m.p("g"), "wb").close()
    os.mkdir(m.p("d"))
    with open(m.p("d", "h"), "wb") as f:
        f.write(b"small")
    os.setxattr(m.p("d", "h"), "user.kept", b"value")
    os.symlink("f", m.p("lnk"))
    os.mkfifo(m.p("fifo"))
    KernelObjects(m.path).create("obj", "generic", 8192)
    seen: dict[str, int] = {}

    @settings(max_examples=int(os.environ.get("PMEMFS_HOSTILE_EXAMPLES", "250")), deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(req=requests, get=st.integers(0, 3).map(lambda n: n == 0))
    def request(req: tuple[str, str, bytes], get: bool) -> None:
        target, name, value = req
        path = m.p(target) if target else m.path
        before = snapshot(m.path)
        try:
            if get:
                os.getxattr(path, name, follow_symlinks=False)
            else:
                os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as e:
            assert e.errno in ANSWERS, (target, name, value[:100], e)
            seen[errno.errorcode[e.errno]] = seen.get(errno.errorcode[e.errno], 0) + 1
            assert snapshot(m.path) == before, (target, name, value[:100], e)
        else:
            seen["ok"] = seen.get("ok", 0) + 1

    request()
    os.statvfs(m.path)  # the mount answers
    assert "Traceback" not in m.log(), m.log()
    # The generator reached the daemon's parsers, not only the kernel's refusals.
    print(seen)
    assert seen.get("EINVAL", 0) > 20 and seen.get("ok", 0) >= 2 and seen.get("ENODATA", 0) > 5, seen
