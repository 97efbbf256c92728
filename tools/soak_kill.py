"""The kill phase of tools/soak.py: the live-update suite's clients while the daemon is
killed or upgraded, with no unmount."""

from __future__ import annotations

import random
from pathlib import Path

from soak_common import Problem, Round, check, unmount_check

from pmemfs.serve import mountctl, mounting


def phase_kill(r: Round) -> str:
    import test_live_update as live

    s, rng = r.scale, random.Random(r.seed)
    m = r.mount(r.region(s.kill_region))
    sup, entry = m.proc.pid, mounting.pmemfs_mount_at(m.path)
    kinds = [rng.choice(("kill", "kill", "upgrade")) for _ in range(s.kill_events)]
    todo = iter(kinds)
    daemons = {m.pid}

    def event() -> None:
        if next(todo) == "kill":
            daemons.add(m.crash())
        else:
            answer = mountctl.ask(m.path, {"verb": "upgrade"})
            check(answer.get("ok"), f"upgrade refused: {answer}")
            daemons.add(answer["daemon_pid"])

    work = Path(r.janitor.scratch("live"))  # the kill-free replay is on tmpfs
    try:
        took = live.interrupt_workload(m, work, s.kill_events, event, seed=r.seed)
    except AssertionError as e:
        raise Problem(f"live-update workload: {str(e).strip()[:600]}") from None
    check(m.proc.poll() is None and m.proc.pid == sup, "the supervisor did not survive the kills")
    check(mounting.pmemfs_mount_at(m.path) == entry and not mounting.is_stale(m.path),
          "the mount was replaced or went dead")
    kills, upgrades = kinds.count("kill"), kinds.count("upgrade")
    check(len(daemons) == len(kinds) + 1, f"{len(daemons)} daemons served {len(kinds)} events")
    log = m.log()
    check(log.count("the standby takes over") == kills and log.count("drained: handing") == upgrades,
          f"the log shows {log.count('the standby takes over')} takeovers and "
          f"{log.count('drained: handing')} drains for {kills} kills and {upgrades} upgrades")
    unmount_check(m)
    r.numbers.update(kills=kills, upgrades=upgrades, max_event_ms=round(max(took) * 1000))
    return (f"{kills} kill -9 + {upgrades} upgrade under 5 clients, no unmount: no client error, "
            f"tree equals the kill-free replay on tmpfs, one supervisor and mount throughout "
            f"(slowest event {max(took) * 1000:.0f} ms)")
