#!/usr/bin/env python3
"""Soak pmemfs: round after round of varied, checked load, for a given time or count.

    nice -n 10 python tools/soak.py --minutes 20 [--json report.json]
    python tools/soak.py --hours 8 --seed 100 --json soak.json
    python tools/soak.py --rounds 5 --small             # every phase once, small (the suite's run)
    python tools/soak.py --phases fsx --seed 1012 --rounds 1   # replay the round printed with seed 1012

Each round takes the next phase in turn and the next seed (--seed, +1 a round), makes a
fresh region in /dev/shm and mounts it through FUSE with `pmemfs mount`'s default
supervisor (live update), runs the phase, and checks it:

  fsx     seeded random I/O on one to three files against an in-memory model: buffered and
          O_DIRECT writes and reads, ftruncate, posix_fallocate, the prealloc control,
          stores and reads through a shared mapping, fsync, dropping cached pages,
          reopening; one kill -9 of the daemon mid-run (the standby takes over; the
          descriptors stay open). Every read is compared with the model; at the end the
          whole files, buffered and O_DIRECT, and again after an unmount and a new mount.
  churn   fsstress-like namespace churn from several processes: create, mkdir, rename
          (to new names, over files, over empty and non-empty directories, into itself),
          link, unlink, rmdir, symlink, setxattr, removexattr, writes and truncates. Each
          process keeps a model of its own directory and checks every call's outcome;
          all of them also race in one shared directory, where only the errors a racing
          caller may get are allowed. Then: each private tree equals its model, the whole
          tree is consistent (link counts, '..', every file readable), no inode leaked, and
          the tree is the same after an unmount and a new mount.
  kill    the live-update suite's five clients (tests/test_live_update.py: a writer that
          fsyncs, a shared-mmap writer, a namespace churner, a verifying reader and a
          lister, all keeping their descriptors open) while the daemon is killed with
          kill -9 or upgraded several times, with no unmount: no client may see an error,
          the tree must equal a kill-free replay of the same seeded operations on tmpfs,
          the supervisor and the mount must be the same ones throughout.
  damage  random metadata damage to unmounted copies of a populated region
          (tools/corrupt.py random_bytes and named damages, as tools/damage_loop.py):
          fsck -n and mount fail only as they should, fsck -y repairs or refuses, a
          repaired region is clean and mounts; some repaired regions are mounted through
          FUSE and every file is read, a new file written, and fsck is clean after.
  enospc  a small region filled from several processes until ENOSPC (by blocks, by
          packed small files, by inodes, or mixed): the mount stays live, every file holds
          exactly the bytes its writes acknowledged (also after an unmount and a new
          mount), removing the files gives back all the space, and the next cycle fills
          it again.

Every round ends with an unmount after which fsck -n (pmemfs-fsck's check, run in this
process) must find nothing and the daemon's log must have no traceback and no ERROR
line. One line per round (phase, seed, result, time, what was checked), per-phase totals
and a summary at the end, --json for a report. The first problem stops the run
(--keep-going: the run goes on and the summary lists every problem): the line says what
failed, the seed and how to replay it, the end of the daemon's log follows, and the exit
status is 1. Always cleans up: mounts, daemons (by PID), region files, scratch
directories, also on SIGINT/SIGTERM. Runs the code of this checkout (PYTHONPATH is set
for the daemons it starts). docs/RELIABILITY.md has the details.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tools")]
# The daemons are new interpreters: they must import this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])

# The phases (one module each) and what they share; imported after sys.path is set, so
# that conftest (tests/) and this checkout's pmemfs are the ones found.
from soak_churn import phase_churn  # noqa: E402
from soak_common import PHASES, SCALES, Janitor, Problem, Round  # noqa: E402
from soak_damage import phase_damage  # noqa: E402
from soak_enospc import phase_enospc  # noqa: E402
from soak_fsx import phase_fsx  # noqa: E402
from soak_kill import phase_kill  # noqa: E402

PHASE_FUNCS = {"fsx": phase_fsx, "churn": phase_churn, "kill": phase_kill, "damage": phase_damage,
               "enospc": phase_enospc}


# ------------------------------------------------------------------------ runner
def machine() -> dict:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    distro = ""
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release") as f:
            distro = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line).get("PRETTY_NAME", "").strip('"')
    return {"cpus": os.cpu_count(), "mem_gib": round(mem / (1 << 30), 1), "kernel": platform.release(),
            "os": distro, "python": platform.python_version()}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as every pmemfs command
        print(f"soak.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--hours", type=float, help="run this long (a round under way finishes)")
    p.add_argument("--minutes", type=float, help="run this long (a round under way finishes)")
    p.add_argument("--rounds", type=int, help="run this many rounds (default: each phase once)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, in turn (default {','.join(PHASES)})")
    p.add_argument("--seed", type=int, default=1, help="seed of the first round; each round adds 1")
    p.add_argument("--small", action="store_true", help="small sizes (the suite's representative run)")
    p.add_argument("--json", help="write a report here")
    p.add_argument("--keep-going", action="store_true",
                   help="after a problem, go on with the next round (the exit status is still 1)")
    p.add_argument("--workdir", help="where mountpoints and logs go (default: a new directory in /tmp)")
    p.add_argument("--inject-fault", action="store_true",
                   help="self-test: the fsx phase changes a byte behind its model, which must be caught")
    a = p.parse_args(argv)
    a.phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    unknown = sorted(set(a.phases) - set(PHASES))
    if unknown or not a.phases:
        p.error(f"unknown phase(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PHASES)}")
    if a.hours is not None and a.minutes is not None:
        p.error("give --hours or --minutes, not both")
    if any(x is not None and x <= 0 for x in (a.hours, a.minutes, a.rounds)):
        p.error("--hours, --minutes and --rounds must be positive")
    return a


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_round(r: Round, janitor: Janitor) -> tuple[str, Problem | None]:
    """One round and its cleanup: what it checked, and its problem if it had one (with the
    end of the daemons' logs, or whatever the cleanup found left over)."""
    problem: Problem | None = None
    checked = ""
    try:
        checked = PHASE_FUNCS[r.phase](r)
    except Problem as e:
        problem = e
    except Exception as e:
        problem = Problem(f"{type(e).__name__}: {e}", traceback.format_exc())
    finally:
        logs = {m.path: m.log() for m in janitor.mounts} if problem else {}
        leftovers = janitor.release()
    for path, text in logs.items():  # the daemons' last words go into the report
        tail = "\n".join(text.splitlines()[-25:])
        problem.detail += f"\n--- end of the daemon log of {path}:\n{tail}"
    if leftovers and problem is None:
        problem = Problem("cleanup: " + "; ".join(leftovers))
    return checked, problem


def print_problem(a: argparse.Namespace, r: Round, secs: float, problem: Problem, entry: dict) -> None:
    """The round's PROBLEM line, its detail and the command that replays it."""
    replay = (f"python tools/soak.py --phases {r.phase} --seed {r.seed} --rounds 1"
              + (" --small" if a.small else "") + (" --inject-fault" if a.inject_fault else ""))
    print(f"round {r.number:4d}  {r.phase:<7} seed {r.seed:<7d} PROBLEM {secs:6.1f} s  {problem}",
          flush=True)
    if problem.detail:
        print("  " + problem.detail.strip().replace("\n", "\n  ")[-3000:], flush=True)
    print(f"  replay: {replay}", flush=True)
    entry.update(problem=str(problem), detail=problem.detail, replay=replay)


def summarize(report: dict, per: dict[str, dict], status: int, elapsed: float) -> None:
    """Per-phase totals (over the rounds that passed) and the summary line; into the report too."""
    done = sum(v["rounds"] for v in per.values())
    for ph, v in per.items():
        totals: collections.Counter = collections.Counter()
        for x in report["rounds"]:
            if x["phase"] == ph and x["result"] == "ok":
                totals.update({k: n for k, n in x["numbers"].items()
                               if isinstance(n, int) and not isinstance(n, bool) and not k.startswith(("max", "largest"))})
                if "mode" in x["numbers"]:
                    totals[f"{x['numbers']['mode']} rounds"] += 1
        v["totals"] = {k: n for k, n in totals.items() if n}
        if v["rounds"]:
            print(f"  {ph:<7} {v['rounds']} rounds, {v['seconds'] / 60:.1f} min, {v['problems']} problem(s); "
                  + ", ".join(f"{k} {n}" for k, n in v["totals"].items()), flush=True)
    problems = len(report["problem_rounds"])
    report.update(elapsed_seconds=round(elapsed, 1), per_phase={p: {**v, "seconds": round(v["seconds"], 1)}
                                                                  for p, v in per.items()},
                  problems=problems, status=status)
    print(f"soak: {done} rounds in {elapsed / 60:.1f} min ("
          + ", ".join(f"{p} {v['rounds']}" for p, v in per.items()) + f"); {problems} problem(s)"
          + "".join(f"; round {x['round']} {x['phase']} seed {x['seed']}: {x['problem'][:200]}"
                    for x in report["problem_rounds"]), flush=True)


def start_report(a: argparse.Namespace, scale_name: str, rounds: int | None, seconds: float,
                 work: str, shm: str) -> dict:
    """The report's head, and the run's first line (where its mounts and regions are)."""
    report: dict = {"tool": "tools/soak.py", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "machine": machine(), "args": {k: v for k, v in vars(a).items()}, "scale": scale_name,
                    "work_dir": work, "shm_dir": shm, "rounds": [], "problem": None, "problem_rounds": []}
    print(f"soak: phases {','.join(a.phases)}, {scale_name} sizes, first seed {a.seed}, "
          + (f"{rounds} rounds" if rounds else "") + (" or " if rounds and seconds else "")
          + (f"{seconds / 60:g} minutes" if seconds else "") + f"; mounts in {work}, regions in {shm}; "
          + ", ".join(f"{k} {v}" for k, v in machine().items()), flush=True)
    return report


def clean_up(janitor: Janitor, work: str, shm: str) -> None:
    """At exit, whatever ended the run: no signal stops the cleanup half-way."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    leftovers = janitor.release()
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)
    if leftovers:
        print("soak: cleanup at exit: " + "; ".join(leftovers), flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("soak.py: must run as root (FUSE mounts with allow_other, kernel caches, fsck of regions)",
              file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    scale_name = "small" if a.small else "normal"
    scale = SCALES[scale_name]
    seconds = (a.hours or 0) * 3600 + (a.minutes or 0) * 60
    rounds = a.rounds if a.rounds is not None else (None if seconds else len(a.phases))
    if a.workdir and not os.path.isdir(a.workdir):
        print(f"soak.py: --workdir {a.workdir}: no such directory", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="pmemfs-soak-", dir=a.workdir)
    shm = tempfile.mkdtemp(prefix="pmemfs-soak-", dir="/dev/shm")
    janitor = Janitor(work, shm)
    t0 = time.monotonic()
    report = start_report(a, scale_name, rounds, seconds, work, shm)
    per: dict[str, dict] = {ph: {"rounds": 0, "seconds": 0.0, "problems": 0} for ph in a.phases}
    status = 0
    k = 0
    try:
        while (rounds is None or k < rounds) and (not seconds or time.monotonic() - t0 < seconds):
            phase = a.phases[k % len(a.phases)]
            r = Round(k + 1, phase, a.seed + k, scale, janitor, inject=a.inject_fault)
            began = time.monotonic()
            checked, problem = run_round(r, janitor)
            secs = time.monotonic() - began
            per[phase]["rounds"] += 1
            per[phase]["seconds"] += secs
            entry = {"round": r.number, "phase": phase, "seed": r.seed, "seconds": round(secs, 1),
                     "result": "ok" if problem is None else "problem", "checked": checked, "numbers": r.numbers}
            report["rounds"].append(entry)
            if problem is None:
                print(f"round {r.number:4d}  {phase:<7} seed {r.seed:<7d} ok {secs:6.1f} s  {checked}", flush=True)
                k += 1
                continue
            print_problem(a, r, secs, problem, entry)
            report["problem"] = report["problem"] or entry
            report["problem_rounds"].append(entry)
            per[phase]["problems"] += 1
            status = 1
            if not a.keep_going:
                break
            k += 1
    except (KeyboardInterrupt, SystemExit) as e:
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
        print(f"soak: interrupted (status {code}) in round {k + 1}; cleaning up", flush=True)
        status = code
        report["interrupted"] = True
    finally:
        clean_up(janitor, work, shm)
    summarize(report, per, status, time.monotonic() - t0)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return status


if __name__ == "__main__":
    sys.exit(main())
