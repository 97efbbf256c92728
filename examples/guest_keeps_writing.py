#!/usr/bin/env python3
"""Demo 2: a guest keeps writing while the daemon is killed and restarted.

A writer process appends fixed-size records (sequence number + checksum) to a file
on pmemfs, fsyncing each one and logging the acknowledged sequence number outside
the mount. Meanwhile the host kills the daemon with SIGKILL and mounts the region
again, several times. The writer never dies: across an outage it waits, reopens,
drops a torn last record if it finds one, and carries on. Afterwards every
acknowledged record must be present, in order, exactly once.

    python examples/guest_keeps_writing.py [--restarts 3] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import errno
import multiprocessing
import os
import struct
import time
import zlib

from _common import Demo, fail, proved, step

RECORD = struct.Struct("<QQ48sI")  # sequence, time ns, payload, crc32 of the rest
DEAD = (errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT, errno.EIO)


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


def on_pmemfs(fd: int) -> bool:
    """Is the open file on a pmemfs mount (and not in the directory under one)?"""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == dev and fields[fields.index("-") + 1] == "fuse.pmemfs":
                return True
    return False


def writer(path: str, ack_path: str, stop_at: float) -> None:
    from pmemfs.mounting import pmemfs_mount_at

    seq = 0
    outages = 0
    mountpoint = os.path.dirname(path)
    with open(ack_path, "a") as ack:
        while time.monotonic() < stop_at:
            if pmemfs_mount_at(mountpoint) is None:
                # Between the dead mount's removal and the new mount the directory is
                # bare: a file opened there would land in the underlying filesystem.
                time.sleep(0.002)
                continue
            try:
                # (Re)open: keep only whole records; the next one continues the sequence.
                with open(path, "r+b" if os.path.exists(path) else "w+b") as f:
                    if not on_pmemfs(f.fileno()):
                        # The dead mount went away between the check above and the open:
                        # this file is in the bare directory underneath. Not ours.
                        f.close()
                        os.unlink(path)
                        time.sleep(0.002)
                        continue
                    data = f.read()
                    good = parse(data)
                    f.truncate(len(good) * RECORD.size)
                    seq = good[-1] + 1 if good else 0
                    f.seek(0, os.SEEK_END)
                    while time.monotonic() < stop_at:
                        f.write(make_record(seq))
                        f.flush()
                        os.fsync(f.fileno())
                        ack.write(f"{seq}\n")
                        ack.flush()
                        seq += 1
            except OSError as e:
                if e.errno not in DEAD:
                    raise
                outages += 1
                time.sleep(0.005)  # the host is restarting the daemon: wait and retry
    with open(ack_path + ".outages", "w") as f:
        f.write(str(outages))


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
                demo.mount()
                print(f"  restart {i + 1}: kill -9, new daemon serving after "
                      f"{(time.monotonic() - died) * 1000:.0f} ms")
            w.join(timeout=a.seconds * 4 + 60)
        finally:
            if w.is_alive():
                w.kill()
        if w.exitcode != 0:
            fail(f"the writer died (exit {w.exitcode})")
        with open(ack) as f:
            acked = [int(x) for x in f]
        with open(ack + ".outages") as f:
            outages = int(f.read())
        with open(path, "rb") as f:
            found = parse(f.read())
        os.unlink(ack)
        os.unlink(ack + ".outages")
        step(f"the writer saw {outages} failed calls across {a.restarts} restarts and kept going")
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
