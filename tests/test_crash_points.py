"""Every crash point of every operation kind leaves the before-state or the after-state.

For each operation, a child process runs it on a copy of a populated region and is
SIGKILLed at the k-th journal step (each undo record written, just before and just
after the commit word), for k = 1, 2, ... until the operation completes. After each
kill the region is mounted (journal rollback, orphan recovery), must pass every
structural check (no leaked or doubly owned block), and must show exactly the
state from before the operation or the one after it.
"""

from __future__ import annotations

import os
import shutil
import traceback

import numpy as np
import pytest

import pmemfs.fs.engine as engine_module
from pmemfs.fs import placement
from pmemfs.fs.engine import RENAME_EXCHANGE, RENAME_WHITEOUT, Engine
from pmemfs.fs.snapshot import snapshot
from pmemfs.media import check
from pmemfs.media.journal import CrashPoints

MiB = 1 << 20
# Fixed at import: forked children must write the same bytes as the reference run.
BLOB_2_5M = os.urandom(5 * MiB // 2)
BLOB_1500 = os.urandom(1500)


def populate(e: Engine) -> None:
    d = e.mkdir(1, b"d", 0o755).ino
    f = e.create(d, b"f", 0o644).ino
    e.write(f, 0, os.urandom(3 * MiB))
    a = e.create(1, b"a", 0o600).ino
    e.write(a, 0, b"alpha" * 1000)
    e.setxattr(a, b"user.x", b"1" * 100)
    e.link(a, 1, b"a2")
    e.symlink(1, b"l", b"/some/where")
    e.mkdir(1, b"e", 0o700)
    big = e.create(1, b"big", 0o644).ino
    for blk in (0, 2, 4):  # three extents with holes between them
        e.write(big, blk * 2 * MiB + 10, b"x" * 1000)
    e.kernel.create("obj", "dma-buffer", 100_000)
    e.write(e.kernel.info("obj").ino, 0, b"payload" * 1000)
    e.kernel.preserve("obj")
    e.kernel.create("obj2", "device-state", 4096)
    e.create(1, b"side", 0o600)  # an empty file to carve into
    for name in (b"s1", b"s2"):  # small files, packed in one block
        e.write(e.create(1, name, 0o644).ino, 0, name * 3000)


def ino(e: Engine, *path: bytes) -> int:
    cur = 1
    for part in path:
        cur = e.lookup(cur, part)
    return cur


def _unlink_batched(e: Engine) -> None:
    engine_module.FREE_BATCH = 1  # one extent per transaction (child process only)
    e.unlink(1, b"big")


def _orphan(e: Engine) -> None:
    f = ino(e, b"d", b"f")
    e.ref(f)  # held open: unlink makes it an orphan, the last forget frees it
    e.unlink(ino(e, b"d"), b"f")
    e.forget(f)


OPERATIONS = {
    "create": lambda e: e.create(1, b"new", 0o644),
    "mkdir": lambda e: e.mkdir(ino(e, b"e"), b"sub", 0o755),
    "mknod_fifo": lambda e: e.mknod(1, b"fifo", 0o010644),
    "symlink": lambda e: e.symlink(ino(e, b"d"), b"s", b"../a" * 300),
    "write_allocating": lambda e: e.write(ino(e, b"a"), MiB, BLOB_2_5M),
    "write_extending": lambda e: e.write(ino(e, b"a"), 5000, b"tail" * 25),
    "write_hole_fill": lambda e: e.write(ino(e, b"big"), 2 * MiB + 5, b"y" * 3 * MiB),
    # the hot path (Engine._write_in_place, one undo record): past the end of file,
    # inside the last block (its size tells old from new; an overwrite changes only times)
    "write_in_place_extending": lambda e: e.write(ino(e, b"d", b"f"), 3 * MiB, b"e" * 4096),
    "truncate_down": lambda e: e.truncate(ino(e, b"big"), 100),
    "truncate_up": lambda e: e.truncate(ino(e, b"a"), 5 * MiB),
    "unlink_data": lambda e: e.unlink(ino(e, b"d"), b"f"),
    "unlink_batched": _unlink_batched,
    "unlink_open_orphan": _orphan,
    "rmdir": lambda e: e.rmdir(1, b"e"),
    "link": lambda e: e.link(ino(e, b"a"), ino(e, b"e"), b"a3"),
    "rename_plain": lambda e: e.rename(1, b"a", 1, b"z"),
    "rename_over_file": lambda e: e.rename(1, b"a", ino(e, b"d"), b"f"),
    "rename_dir_across": lambda e: e.rename(1, b"d", ino(e, b"e"), b"d2"),
    "rename_over_dir": lambda e: e.rename(1, b"d", 1, b"e"),
    "rename_exchange": lambda e: e.rename(1, b"a", ino(e, b"d"), b"f", RENAME_EXCHANGE),
    "rename_whiteout": lambda e: e.rename(1, b"a", ino(e, b"d"), b"f", RENAME_WHITEOUT),
    "setxattr_chained": lambda e: e.setxattr(ino(e, b"a"), b"user.big", BLOB_1500),
    "setxattr_replace": lambda e: e.setxattr(ino(e, b"a"), b"user.x", b"2" * 700),
    "removexattr": lambda e: e.removexattr(ino(e, b"a"), b"user.x"),
    "chmod_chown": lambda e: e.setattr(ino(e, b"a"), mode=0o640, uid=7, gid=8),
    "chattr": lambda e: e.set_attr_flags(ino(e, b"a"), 0x30),
    "kobj_create": lambda e: e.kernel.create("new", "iommu-page-table", 3 * MiB),
    "kobj_preserve": lambda e: e.kernel.preserve("obj2"),
    "kobj_unpreserve": lambda e: e.kernel.unpreserve("obj"),
    "kobj_freeze": lambda e: e.kernel.freeze(),
    "kobj_remove": lambda e: e.kernel.remove("obj2"),
    "prealloc": lambda e: placement.prealloc(e, ino(e, b"a"), 5 * MiB),
    "carve": lambda e: placement.carve(e, ino(e, b"big"), 2 * MiB, 4 * MiB, ino(e, b"side")),
    "small_new": lambda e: e.write(e.lookup(1, b"side"), 0, b"tiny" * 100),
    "small_grow_in_place": lambda e: e.write(ino(e, b"s2"), 6000, b"g" * 9000),
    "small_grow_moves": lambda e: e.write(ino(e, b"s1"), 6000, b"m" * 20000),
    "small_outgrows": lambda e: e.write(ino(e, b"s1"), 60000, b"o" * 10000),
    "small_write_far": lambda e: e.write(ino(e, b"s2"), 5 * MiB, b"f"),
    "small_truncate": lambda e: e.truncate(ino(e, b"s1"), 10),
    "small_unlink": lambda e: e.unlink(1, b"s1"),
}


# Data is written in place and not journaled: a write that was in flight at the kill may
# show old or new bytes in the range it overwrites (never another file's bytes), while
# its metadata (size, blocks) is before or after. docs/DESIGN.md says the same.
WRITES = {"write_allocating": b"/a", "write_extending": b"/a", "write_hole_fill": b"/big",
          "write_in_place_extending": b"/d/f"}


def without_content(state: dict, path: bytes) -> dict:
    tree = dict(state["tree"])
    tree[path] = (*tree[path][:8], None, *tree[path][9:])
    return {**state, "tree": tree}


def file_bytes(region: str, path: bytes) -> np.ndarray:
    e = Engine(region, readonly=True)
    try:
        i = ino(e, *path.strip(b"/").split(b"/"))
        return np.frombuffer(bytes(e.read(i, 0, e.stat(i).size)), np.uint8)
    finally:
        e.close()


def old_or_new(old: np.ndarray, new: np.ndarray, got: np.ndarray) -> bool:
    n = len(got)
    o = np.zeros(n, np.uint8)
    o[: min(n, len(old))] = old[:n]
    w = np.zeros(n, np.uint8)
    w[: min(n, len(new))] = new[:n]
    return bool(np.all((got == o) | (got == w)))


def run_child(path: str, op, crash_at: int | None) -> int:
    """Run op on the region in a forked child; returns its exit code (-9 when killed)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 0
        try:
            e = Engine(path)
            if crash_at is not None:
                e.journal.crash = CrashPoints(crash_at, "kill")
            op(e)
            e.close()
        except BaseException:
            traceback.print_exc()
            status = 3
        os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def mounted_state(path: str) -> dict:
    e = Engine(path)  # recovers the journal and frees orphans
    try:
        errors = [f.message for f in check.structure(e.t, e.sb, e.hwm) if f.severity == "error"]
        assert not errors, errors
        return snapshot(e)
    finally:
        e.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    from pmemfs.media.mkfs import make_filesystem

    path = f"/dev/shm/pmemfs-crash-template-{os.getpid()}.region"
    make_filesystem(path, size=32 * MiB, inodes=64)
    e = Engine(path)
    populate(e)
    e.close()
    yield path
    os.unlink(path)


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_every_crash_point(template, name):
    op = OPERATIONS[name]
    work = template + f".{name}"
    try:
        shutil.copyfile(template, work)
        before = mounted_state(work)
        shutil.copyfile(template, work)
        assert run_child(work, op, None) == 0
        after = mounted_state(work)
        assert after != before, "the operation changed nothing"
        written = WRITES.get(name)
        if written:
            old_bytes, new_bytes = file_bytes(template, written), file_bytes(work, written)
            before, after = without_content(before, written), without_content(after, written)
        seen = {"before": 0, "after": 0}
        for k in range(1, 500):
            shutil.copyfile(template, work)
            code = run_child(work, op, k)
            if code == 0:
                break  # k is past the operation's last step
            assert code == -9, f"child failed at step {k} with {code}"
            state = mounted_state(work)
            if written:
                assert old_or_new(old_bytes, new_bytes, file_bytes(work, written)), \
                    f"crash at step {k} left bytes that are neither old nor new"
                state = without_content(state, written)
            if state == before:
                seen["before"] += 1
            else:
                assert state == after, f"crash at step {k} of {name} left a third state"
                seen["after"] += 1
        else:
            pytest.fail("operation never completed")
        # Killing at the earliest steps must roll back; at the last, the op is done.
        assert seen["before"] >= 1 and seen["after"] >= 1, seen
    finally:
        if os.path.exists(work):
            os.unlink(work)
