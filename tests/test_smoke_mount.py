"""The shortest path through everything: mkfs, mount, write, restart, read back."""

import os


def test_write_kill_remount_read(mounted):
    data = os.urandom(3 << 20)
    with open(mounted.p("f"), "wb") as f:
        f.write(data)
    os.mkdir(mounted.p("d"))
    mounted.restart()
    with open(mounted.p("f"), "rb") as f:
        assert f.read() == data
    assert sorted(os.listdir(mounted.path)) == ["d", "f"]
    assert "recovered" in mounted.status or "clean=0" in mounted.status
