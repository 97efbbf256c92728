"""A request resent to a successor daemon is carried out exactly once.

For each namespace operation, a child process runs it as caller pid P and is killed
at every journal step: before the commit, at the commit word, and after it (the
moment between "transaction committed" and "reply sent"). The successor opens the
region as a takeover and receives the same request again, as the kernel resends it
(FUSE_NOTIFY_RESEND). It must succeed, with the entry the first run made where there
is one, and leave exactly the state one execution leaves.
"""

from __future__ import annotations

import os
import shutil
import traceback

import pytest
from test_crash_points import ino, mounted_state, populate

from pmemfs.fs.engine import RENAME_EXCHANGE, RENAME_WHITEOUT, XATTR_CREATE, Ctx, Engine, FsError
from pmemfs.fs.replies import Replies
from pmemfs.media.journal import CrashPoints, Journal
from pmemfs.media.region import Region

CALLER = Ctx(0, 0, 4242)
OTHER = Ctx(0, 0, 4343)

OPERATIONS = {
    "create": lambda e, c: e.create(1, b"new", 0o644, c).ino,
    "mkdir": lambda e, c: e.mkdir(ino(e, b"e"), b"sub", 0o755, c).ino,
    "mknod_fifo": lambda e, c: e.mknod(1, b"fifo", 0o010644, 0, c).ino,
    "symlink": lambda e, c: e.symlink(ino(e, b"d"), b"s", b"../a", c).ino,
    "link": lambda e, c: e.link(ino(e, b"a"), ino(e, b"e"), b"a3", c).ino,
    "unlink": lambda e, c: e.unlink(ino(e, b"d"), b"f", c),
    "rmdir": lambda e, c: e.rmdir(1, b"e", c),
    "rename": lambda e, c: e.rename(1, b"a", 1, b"z", 0, c),
    "rename_over_file": lambda e, c: e.rename(1, b"a", ino(e, b"d"), b"f", 0, c),
    "rename_exchange": lambda e, c: e.rename(1, b"a", ino(e, b"d"), b"f", RENAME_EXCHANGE, c),
    "rename_whiteout": lambda e, c: e.rename(1, b"a", ino(e, b"d"), b"f", RENAME_WHITEOUT, c),
    "setxattr_create": lambda e, c: e.setxattr(ino(e, b"a"), b"user.new", b"v", XATTR_CREATE, c),
    "removexattr": lambda e, c: e.removexattr(ino(e, b"a"), b"user.x", c),
}


def run_child(path: str, name: str, crash_at: int | None) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 0
        try:
            e = Engine(path)
            if crash_at is not None:
                e.journal.crash = CrashPoints(crash_at, "kill")
            OPERATIONS[name](e, CALLER)
            os._exit(0)  # no close, no settle: the answer never left
        except BaseException:
            traceback.print_exc()
            status = 3
        os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def resend(path: str, name: str, ctx: Ctx = CALLER):
    """The successor takes over and gets the same request again."""
    e = Engine(path, takeover=True)
    try:
        return OPERATIONS[name](e, ctx)
    finally:
        e.close()


@pytest.fixture(scope="module")
def template():
    from pmemfs.media.mkfs import make_filesystem

    path = f"/dev/shm/pmemfs-once-template-{os.getpid()}.region"
    make_filesystem(path, size=32 << 20, inodes=64)
    e = Engine(path)
    populate(e)
    e.close()
    yield path
    os.unlink(path)


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_resent_after_a_kill_at_every_step_runs_once(template, name):
    work = template + f".{name}"
    try:
        shutil.copyfile(template, work)
        assert run_child(work, name, None) == 0
        after = mounted_state(work)
        steps = {"rolled back": 0, "committed": 0}
        for k in range(1, 500):
            shutil.copyfile(template, work)
            code = run_child(work, name, k)
            if code == 0:
                break
            assert code == -9, f"child failed at step {k} with {code}"
            with Region(work, writable=False, lock=False) as r:
                committed = Journal(r.buf, r.size).state == 0 and Replies(r.buf, 0)._valid(0)
            steps["committed" if committed else "rolled back"] += 1
            resend(work, name)  # must not raise EEXIST, ENOENT, ENODATA
            assert mounted_state(work) == after, f"kill at step {k}: the resend did not run exactly once"
        else:
            pytest.fail("operation never completed")
        assert steps["rolled back"] >= 1 and steps["committed"] >= 1, steps
    finally:
        if os.path.exists(work):
            os.unlink(work)


def test_a_request_from_another_caller_is_not_taken_for_a_resend(template):
    work = template + ".other"
    try:
        shutil.copyfile(template, work)
        assert run_child(work, "mkdir", None) == 0
        with pytest.raises(FsError) as err:
            resend(work, "mkdir", OTHER)  # same name, another thread: a real EEXIST
        assert err.value.errno == 17
    finally:
        os.unlink(work)


def test_a_settled_record_is_not_replayed(template):
    """Once the answer was sent (settle), the same request again is a new request."""
    work = template + ".settled"
    try:
        shutil.copyfile(template, work)
        e = Engine(work)
        OPERATIONS["mkdir"](e, CALLER)
        e.settle()
        e.region.close()  # dies without a clean close, after the answer
        with pytest.raises(FsError) as err:
            resend(work, "mkdir")
        assert err.value.errno == 17
    finally:
        os.unlink(work)


def test_a_fresh_mount_forgets_the_record(template):
    """A new connection resends nothing: after a remount the record means nothing."""
    work = template + ".fresh"
    try:
        shutil.copyfile(template, work)
        assert run_child(work, "mkdir", None) == 0
        e = Engine(work)
        try:
            with pytest.raises(FsError):
                OPERATIONS["mkdir"](e, CALLER)
        finally:
            e.close()
    finally:
        os.unlink(work)
