#!/usr/bin/env python3
"""Demo 3: what a clean and an unclean restart look like from the region's side.

Shows the superblock's state and mount generation across (1) a clean unmount and
mount, (2) a kill -9 of supervisor and daemon between operations (the connection
ends; a new mount), and (3) a kill -9 of the daemon in the middle of a transaction
(injected with PMEMFS_CRASH_AT): the supervisor's standby rolls it back and the
kernel's resent request completes once, so the caller never notices.

    python examples/clean_vs_unclean.py
"""

from __future__ import annotations

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

        step("2. unclean restart: kill -9 of the supervisor and the daemon between operations "
             "(the FUSE connection ends)")
        demo.kill_all()
        d = show("after kill -9", demo.region)
        demo.mount()
        print(f"  {demo.last_mount_line}")
        if d["state"] != "dirty" or "clean=0" not in demo.last_mount_line:
            fail("a killed daemon's region should be dirty and the mount should say so")
        proved("the killed daemon left the region dirty; the mount noticed, checked it and served it")

        step("3. kill -9 in the middle of a transaction (the daemon dies at its mkdir's 3rd "
             "journal step); the supervisor's standby takes the connection over")
        cli("pmemfs", "umount", demo.mp)
        demo.mount(env={**os.environ, "PMEMFS_CRASH_AT": "3"})
        os.mkdir(demo.p("never"))  # blocks across the death; the kernel resends it
        info = json.loads(cli("pmemfs", "info", "--json", demo.mp).stdout)
        if info.get("daemon_restarts") != 1:
            fail(f"expected one takeover, saw {info.get('daemon_restarts')}")
        print("  the mkdir returned 0: the first daemon died inside it, the successor rolled the "
              "half-made transaction back and carried the resent request out once")
        if os.listdir(demo.mp).count("never") != 1:
            fail("the directory is not there exactly once")
        with open(demo.p("hello")) as f:
            if f.read() != "hello, kexec\n":
                fail("hello changed")
        show("after the takeover", demo.region)
        proved("the successor rolled the half-done mkdir back and ran the resent one exactly "
               "once; everything else is as it was")
    print("clean and unclean restarts both end in a consistent region")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
