"""Record checksums: the CRC-32 algebra fsck restores records with, what a free record
looks like, and the "checksums" check."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator

import numpy as np

from ..format import record_checksums
from .core import KEY_FIELD, Finding, View, check, per_object, table_arrays


@functools.lru_cache(maxsize=16)
def crc_bit_columns(length: int) -> np.ndarray:
    """CRC-32 is affine over GF(2): crc(a ^ b) = crc(a) ^ crc(b) ^ crc(0) for messages of one
    length. Column k is what flipping bit k (bit k % 8 of byte k // 8) of a `length`-byte
    message does to its CRC; a damaged record's syndrome is the XOR of the columns of its
    flipped bits, which is what lets fsck restore records (pmemfs/tools/fsck/restore.py)."""
    zero = bytes(length)
    c0 = zlib.crc32(zero)
    out = np.empty(length * 8, np.uint32)
    msg = bytearray(length)
    for k in range(length * 8):
        msg[k // 8] = 1 << (k % 8)
        out[k] = zlib.crc32(msg) ^ c0
        msg[k // 8] = 0
    return out


def crc_of_field(length: int, offset: int, values: np.ndarray, nbits: int = 32) -> np.ndarray:
    """lin(value placed at byte offset): what a field's bits contribute to the CRC of a
    zero message (vectorised over values)."""
    cols = crc_bit_columns(length)[offset * 8: offset * 8 + nbits]
    values = np.asarray(values, np.uint64)
    bits = ((values[:, None] >> np.arange(nbits, dtype=np.uint64)) & np.uint64(1)).astype(bool)
    return np.bitwise_xor.reduce(np.where(bits, cols[None, :], np.uint32(0)), axis=1).astype(np.uint32) \
        if len(values) else np.zeros(0, np.uint32)


def damaged_free(name: str, arr: np.ndarray, hwm: int, chunk: int = 1 << 16) -> np.ndarray:
    """Slots below hwm whose key field says "free" but which are not empty.

    pmemfs frees a record by zeroing it (an inode keeps its generation) and sealing it,
    and mkfs leaves unused records all zero, so a free record is all zero but for that
    and a checksum of 0 or of its zeros. Anything else is damage, most likely to the key
    field of a record in use: a file that would silently lose a name, blocks or an xattr."""
    size = arr.dtype.itemsize
    hwm = min(hwm, len(arr))
    words = arr[:hwm].view(np.uint64).reshape(hwm, size // 8)  # every record is 8-byte aligned
    mask = np.full(size // 8, ~np.uint64(0))
    mask[-1] = np.uint64(0xFFFFFFFF)  # the checksum is the last 4 bytes
    if name == "inode":
        mask[2] = np.uint64(0xFFFFFFFF)  # bytes 20..24: the generation a free inode keeps
    key = arr[KEY_FIELD[name]][:hwm]
    empty_crc = np.uint32(zlib.crc32(bytes(size - 4)))
    out = []
    for lo in range(1, hwm, chunk):
        hi = min(hwm, lo + chunk)
        free = key[lo:hi] == 0
        nonempty = free & (words[lo:hi] & mask).any(axis=1)
        ck = arr["checksum"][lo:hi]
        odd = free & ~nonempty & (ck != 0)
        if name == "inode" and odd.any():
            k = np.flatnonzero(odd)
            want = empty_crc ^ crc_of_field(size - 4, 20, arr["generation"][lo:hi][k])
            odd[k] = ck[k] != want
        else:
            odd &= ck != empty_crc
        out.append(np.flatnonzero(nonempty | odd) + lo)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@check("checksums")
def check_checksums(v: View) -> Iterator[Finding]:
    for name, table, used in (("inode", v.inodes, np.flatnonzero(v.live)), ("extent", v.extents, v.ext_used),
                              ("dirent", v.dirents, v.dir_used), ("blob", v.blobs, v.blob_used),
                              ("pack", v.packs, v.pack_used)):
        if not len(used):
            continue
        bad = used[record_checksums(table, used) != table["checksum"][used]]
        for f in per_object("checksums", "checksum", "y", f"{name}", bad,
                       lambda i, name=name: f"{name} record {i} checksum mismatch"):
            f.data["table"] = name
            yield f
    for name, table in table_arrays(v).items():
        bad = damaged_free(name, table, len(table))
        for f in per_object("checksums", "free-damaged", "y", f"{name}", bad,
                       lambda i, name=name: f"{name} record {i} is marked free but is not empty "
                                            f"(its {KEY_FIELD[name]} field may be damaged)"):
            f.data["table"] = name
            yield f
