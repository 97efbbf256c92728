#!/usr/bin/env python3
"""Demo 2: a guest keeps writing while the daemon is killed and restarted.

A writer process appends fixed-size records (sequence number + checksum) to a file
on pmemfs through one descriptor, fsyncing each one and logging the acknowledged
sequence number outside the mount. Meanwhile the host kills the daemon with SIGKILL,
several times; the supervisor's standby takes the connection over each time. The
writer never reopens and never sees an error, only a pause. Afterwards every
acknowledged record must be present, in order, exactly once.

    python examples/guest_keeps_writing.py [--restarts 3] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import struct
import time
import zlib

from _common import Demo, fail, proved, step

RECORD = struct.Struct("<QQ48sI")  # sequence, time ns, payload, crc32 of the rest


def make_record(seq: int) -> bytes:
    body = struct.pack("<QQ48s", seq, time.time_ns(), f"record {seq}".encode().ljust(48, b"."))
    return body + struct.pack("<I", zlib.crc32(body))


def parse(data: bytes) -> list[int]:
    """Sequence numbers of the whole, valid records; stops at the first torn one."""
    seqs = []
    for off in range(0, len(data) - RECORD.size + 1, RECORD.size):
        rec = data[off:off + RECORD.size]
        seq, _, _, crc = RECORD.unpack(rec)
        if zlib.crc32(rec[:-4]) != crc:
            break
        seqs.append(seq)
    return seqs


def writer(path: str, ack_path: str, stop_at: float) -> None:
    """One descriptor for the whole run: a daemon restart is only a pause to it, so
    any error at all is a failure (the process exits non-zero)."""
    seq = 0
    longest = 0.0
    with open(ack_path, "a") as ack, open(path, "w+b") as f:
        last = time.monotonic()
        while time.monotonic() < stop_at:
            f.write(make_record(seq))
            f.flush()
            os.fsync(f.fileno())
            ack.write(f"{seq}\n")
            ack.flush()
            seq += 1
            now = time.monotonic()
            longest, last = max(longest, now - last), now
    with open(ack_path + ".stall", "w") as f:
        f.write(f"{longest}")


def main() -> int:
    ap = argparse.ArgumentParser(description="a writer keeps going while the daemon is restarted")
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0, help="time between restarts")
    a = ap.parse_args()
    with Demo("writer", "256M") as demo:
        path, ack = demo.p("journal.log"), f"/tmp/pmemfs-writer-{os.getpid()}.acks"
        if os.path.exists(ack):
            os.unlink(ack)
        stop_at = time.monotonic() + a.seconds * (a.restarts + 1) + 2
        w = multiprocessing.get_context("fork").Process(target=writer, args=(path, ack, stop_at))
        step("a writer appends and fsyncs records continuously")
        w.start()
        try:
            for i in range(a.restarts):
                time.sleep(a.seconds)
                died = demo.kill9()
                demo.wait_for_replacement(demo.last_killed)
                print(f"  restart {i + 1}: kill -9, the standby serves the same connection after "
                      f"{(time.monotonic() - died) * 1000:.0f} ms")
            w.join(timeout=a.seconds * 4 + 60)
        finally:
            if w.is_alive():
                w.kill()
        if w.exitcode != 0:
            fail(f"the writer died (exit {w.exitcode})")
        with open(ack) as f:
            acked = [int(x) for x in f]
        with open(ack + ".stall") as f:
            stall = float(f.read())
        with open(path, "rb") as f:
            found = parse(f.read())
        os.unlink(ack)
        os.unlink(ack + ".stall")
        step(f"the writer kept its descriptor across {a.restarts} kills and never saw an error; "
             f"its longest wait for a write + fsync: {stall * 1000:.0f} ms")
        if not acked:
            fail("nothing was acknowledged")
        if found != list(range(len(found))):
            fail("records are out of order or repeated")
        missing = sorted(set(acked) - set(found))
        if missing:
            fail(f"{len(missing)} acknowledged records are missing, first {missing[0]}")
        proved(f"all {len(acked)} acknowledged records are present, in order, exactly once "
               f"({len(found)} on file)")
    print("the guest's writes survived every restart")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
