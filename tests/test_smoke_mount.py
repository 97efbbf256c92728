"""The shortest path through everything: mkfs, mount, write, restart, read back."""

import os
import re


def ready_fields(status: str) -> dict[str, int]:
    """The daemon's ready line, "ok generation=N clean=0|1 recovered=N orphans=N"."""
    assert status.startswith("ok "), status
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", status)}


def test_write_kill_remount_read(mounted):
    first = ready_fields(mounted.status)
    assert first["clean"] == 1  # a fresh region was cleanly unmounted by mkfs
    data = os.urandom(3 << 20)
    with open(mounted.p("f"), "wb") as f:
        f.write(data)
    os.mkdir(mounted.p("d"))
    mounted.restart()
    with open(mounted.p("f"), "rb") as f:
        assert f.read() == data
    assert sorted(os.listdir(mounted.path)) == ["d", "f"]
    after = ready_fields(mounted.status)
    assert after["clean"] == 0, mounted.status  # kill -9 left the superblock dirty
    assert after["generation"] == first["generation"] + 1
