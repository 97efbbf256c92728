#!/usr/bin/env python3
"""pmemfs benchmark harness (`./run bench`).

Runs each workload against these targets (tools/bench_targets.py) in one run,
interleaved (A B C D A B C D ...) so that machine drift lands on all of them alike:

  pmemfs-shm      pmemfs, region in /dev/shm, mounted with -o prefault
  pmemfs-huge     pmemfs, region on hugetlbfs (only when huge pages can be reserved)
  pmemfs-wb       pmemfs-shm plus -o writeback (skipped with a note if pmemfs refuses it)
  tmpfs           a fresh kernel tmpfs mount
  passthrough     tools/passthroughfs.py (minimal pyfuse3 + trio) over a fresh tmpfs
  passthrough_ll  libfuse's C example passthrough_ll, compiled for the run, over a fresh
                  tmpfs: the reference of the goals (skipped with a note without gcc)

`--targets` picks some of them, `--pmemfs NAME=OPT,OPT` adds a pmemfs target on
/dev/shm with those mount options. It prints one table: median, min-max, the
baselines' medians, the ratio pmemfs / baseline and the project's goal with
met/MISSED, then a table of the FUSE requests per operation of the pmemfs targets
(counted in a separate short pass with `pmemfs mount --debug`, never in the timed
runs). `--json FILE` writes the same as JSON, `--markdown FILE` the tables as
Markdown (docs/BENCHMARKS.md uses it).

Needs root (mounts, drop_caches, huge pages), /dev/fuse and fio. Everything it
mounts, starts or reserves is undone in `finally` blocks: mounts unmounted, daemons
it started stopped by PID, huge pages given back, regions under /dev/shm deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

# The harness's parts, imported after sys.path is set: the targets (bench_targets), the
# rows and goals (bench_results), fio and /proc readings (bench_measure), the run and its
# interleaved loop (bench_run), the timed workloads (bench_workloads), the other sections
# (bench_scale, bench_requests) and the tables (bench_report).
from bench_measure import fio  # noqa: E402
from bench_report import machine, markdown, print_table  # noqa: E402
from bench_results import BASELINES, PROFILES, Profile, human_bytes  # noqa: E402
from bench_run import Bench  # noqa: E402
from bench_scale import direct_access, many_files, metadata_size, request_counts  # noqa: E402
from bench_targets import PMEMFS_VARIANTS, PmemfsVariant, log  # noqa: E402
from bench_workloads import _meta_client, io_workloads, meta_workloads  # noqa: E402

# pmemfs itself is imported late and Engine is used in child processes (`--internal`):
# the package may change on disk while a run goes on, and every region the harness
# makes must be made and read by the code that mounts it.

DEFAULT_TARGETS = "pmemfs-shm,pmemfs-huge,pmemfs-wb,tmpfs,passthrough,passthrough_ll"


def _internal(argv: list[str]) -> int:
    """Helpers run in a child process: `populate REGION N`, `extents REGION INO`,
    `meta-client DIR N`."""
    what, region, n = argv[0], argv[1], int(argv[2])
    if what == "meta-client":
        _meta_client(region, n)
        return 0
    from pmemfs.fs.engine import Engine

    if what == "populate":
        _populate(Engine, region, n)
    elif what == "extents":
        e = Engine(region, readonly=True, check_on_mount=False)
        try:
            print(len(e.extents(n)))
        finally:
            e.close()
    return 0


def _populate(Engine, region: str, n: int) -> None:
    e = Engine(region)
    try:
        per_dir = 1000
        for d in range(-(-n // per_dir)):
            parent = e.mkdir(1, b"d%04d" % d, 0o755).ino
            for i in range(min(per_dir, n - d * per_dir)):
                e.create(parent, b"file-%06d" % i, 0o644)
    finally:
        e.close()



# ----------------------------------------------------------------- main
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Profile]:
    """The options, with the targets checked (target_list, extra_variants) and the profile."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, one run (smoke test)")
    ap.add_argument("--runs", type=int, help="runs per workload and target (default 3)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    ap.add_argument("--no-hugetlbfs", action="store_true", help="do not reserve huge pages")
    ap.add_argument("--only", default="io,meta,requests,size,many,direct",
                    help="comma-separated sections: io, meta, requests, size, many, direct")
    ap.add_argument("--targets", default=DEFAULT_TARGETS,
                    help=f"comma-separated targets, in this order (default {DEFAULT_TARGETS}; "
                         "any --pmemfs names are added)")
    ap.add_argument("--pmemfs", action="append", default=[], metavar="NAME=OPT,OPT",
                    help="add a pmemfs target NAME (region in /dev/shm) mounted with -o OPT,OPT, "
                         "e.g. pmemfs-noacl=prefault,noacl; repeatable")
    args = ap.parse_args(argv)
    args.extra_variants = {}
    for spec in args.pmemfs:
        name, eq, opts = spec.partition("=")
        if not eq or not name.startswith("pmemfs-") or name in PMEMFS_VARIANTS:
            ap.error(f"--pmemfs {spec}: expected NAME=OPTIONS with a new NAME starting pmemfs-")
        args.extra_variants[name] = PmemfsVariant(name, "shm", tuple(o for o in opts.split(",") if o))
    known = {*PMEMFS_VARIANTS, *args.extra_variants, *BASELINES}
    args.target_list = [n for n in args.targets.split(",") if n]
    args.target_list += [n for n in args.extra_variants if n not in args.target_list]
    unknown = [n for n in args.target_list if n not in known]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    prof = PROFILES["tiny" if args.tiny else "quick" if args.quick else "default"]
    if args.runs:
        prof = Profile(**{**prof.__dict__, "runs": args.runs})
    return args, prof


def run_sections(b: Bench, only: set[str]) -> bool:
    """Start the targets, run the chosen sections, stop everything; True if a section failed."""
    def data_files() -> None:  # the size section needs data.dat even without the io rows
        for t in b.targets:
            fio(t.p("data.dat"), "write", "1m", b.prof.file_size)

    sections = [("io", (lambda: io_workloads(b)) if "io" in only else data_files),
                ("meta", lambda: meta_workloads(b)), ("requests", lambda: request_counts(b)),
                ("size", lambda: metadata_size(b)), ("many", lambda: many_files(b)),
                ("direct", lambda: direct_access(b))]
    failed = False
    try:
        b.setup()
        for name, fn in sections:
            if name in only or (name == "io" and "size" in only):
                try:
                    fn()
                except Exception as e:  # keep what the other sections measured
                    failed = True
                    traceback.print_exc()
                    b.res.notes.append(f"section {name} failed: {type(e).__name__}: {e}")
    finally:
        b.teardown()
    return failed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--internal"]:
        return _internal(argv[1:])
    args, prof = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (mounts, drop_caches, huge pages)", file=sys.stderr)
        return 2
    if shutil.which("fio") is None:
        print("bench: fio is missing (apt-get install -y fio)", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    b = Bench(prof, args)
    started = time.monotonic()
    info = machine()
    log(f"profile {prof.name}: file {human_bytes(prof.file_size)}, {prof.runs} run(s); workdir {b.base}")
    failed = run_sections(b, set(args.only.split(",")))
    b.finish()
    elapsed = time.monotonic() - started
    info["elapsed_s"] = round(elapsed, 1)
    print()
    print_table(b.res, b.requests)
    print(f"\n{prof.name} profile, {prof.runs} run(s) per target, {elapsed:.0f} s; "
          f"ratios are pmemfs/baseline of the medians (for times in s, lower is better)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "profile": prof.__dict__, "notes": b.res.notes,
                       "targets": [t.name for t in b.targets],
                       "rows": [b.res.rows[k].as_json() for k in b.res.order],
                       "requests": b.requests}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(b.res, b.requests))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
