#!/usr/bin/env python3
"""Demo 3: what a clean and an unclean restart look like from the region's side.

Shows the superblock's state and mount generation across (1) a clean unmount and
mount, (2) a kill -9 between operations, and (3) a kill in the middle of a
transaction (injected with PMEMFS_CRASH_AT), which the next mount rolls back.

    python examples/clean_vs_unclean.py
"""

from __future__ import annotations

import errno
import json
import os

from _common import Demo, cli, fail, proved, step


def info(region: str) -> dict:
    return json.loads(cli("pmemfs", "info", "--json", region).stdout)


def show(label: str, region: str) -> dict:
    i = info(region)
    print(f"  {label:<34} state={i['state']:<5} generation={i['mount_generation']:<3} journal={i['journal']}")
    return i


def main() -> int:
    with Demo("restarts", "128M") as demo:
        with open(demo.p("hello"), "w") as f:
            f.write("hello, kexec\n")
        a = show("mounted", demo.region)

        step("1. clean restart: pmemfs umount, then mount")
        cli("pmemfs", "umount", demo.mp)
        b = show("after umount", demo.region)
        demo.mount()
        print(f"  {demo.last_mount_line}")
        c = show("after mount", demo.region)
        if not (b["state"] == "clean" and c["state"] == "dirty" and c["mount_generation"] == a["mount_generation"] + 1):
            fail("clean restart did not mark clean, then dirty with the next generation")
        proved("umount marks the region clean; the next mount marks it dirty and bumps the generation")

        step("2. unclean restart: kill -9 between operations")
        demo.kill9()
        d = show("after kill -9", demo.region)
        demo.mount()
        print(f"  {demo.last_mount_line}")
        if d["state"] != "dirty" or "clean=0" not in demo.last_mount_line:
            fail("a killed daemon's region should be dirty and the mount should say so")
        proved("the killed daemon left the region dirty; the mount noticed, checked it and served it")

        step("3. kill in the middle of a transaction (mkdir dies at its 3rd journal step)")
        cli("pmemfs", "umount", demo.mp)
        demo.mount(env={"PMEMFS_CRASH_AT": "3"})
        try:
            os.mkdir(demo.p("never"))
            fail("mkdir succeeded although the daemon was told to die inside it")
        except OSError as e:
            if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                fail(f"unexpected error: {e}")
            print(f"  mkdir failed with: {e.strerror}")
        show("after the crash", demo.region)
        demo.mount()
        print(f"  {demo.last_mount_line}")
        if "recovered=0" in demo.last_mount_line:
            fail("the interrupted transaction was not rolled back")
        if os.path.exists(demo.p("never")):
            fail("the half-made directory exists after recovery")
        with open(demo.p("hello")) as f:
            if f.read() != "hello, kexec\n":
                fail("hello changed")
        show("after recovery", demo.region)
        proved("the journal rolled the half-done mkdir back; everything else is as it was")
    print("clean and unclean restarts both end in a consistent region")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
