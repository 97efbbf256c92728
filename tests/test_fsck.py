"""pmemfs-fsck: every named damage is found (-n), repaired (-y), and the region mounts."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat as statmod
import subprocess
import sys

import pytest

from pmemfs.fs.engine import Engine, MountError
from pmemfs.media.format import SB_STRUCT, FormatError
from pmemfs.media.region import RegionError
from pmemfs.tools import fsck as fsckmod
from pmemfs.tools.fsck import fsck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import corrupt  # noqa: E402
import damage_loop  # noqa: E402

FSCK = os.path.join(os.path.dirname(sys.executable), "pmemfs-fsck")  # the venv running the suite
BS = 2 << 20


def populate(path: str) -> dict:
    """A few dirs, files (some spanning blocks), symlinks, a hard link and xattrs.

    Returns {ino: expected} where expected is ("file", bytes, xattrs) or ("link", target).
    """
    rng = random.Random(7)
    e = Engine(path)
    try:
        a = e.mkdir(1, b"a", 0o755).ino
        b = e.mkdir(a, b"b", 0o755).ino
        c = e.mkdir(1, b"c", 0o700).ino
        files = {}
        for parent, name, size in ((1, b"f1", BS + 5000), (a, b"f2", 1000), (b, b"f3", 2 * BS + 1),
                                   (c, b"f4", 10), (1, b"empty", 0)):
            ino = e.create(parent, name, 0o644).ino
            data = rng.randbytes(size)
            e.write(ino, 0, data)
            files[ino] = data
        e.link(next(iter(files)), c, b"hardlink")
        xattrs = {}
        first = next(iter(files))
        e.setxattr(first, b"user.big", b"x" * 1500)
        e.setxattr(first, b"user.small", b"v")
        xattrs[first] = {b"user.big": b"x" * 1500, b"user.small": b"v"}
        e.setxattr(a, b"user.dir", b"d")
        links = {e.symlink(1, b"l1", b"a/f2").ino: b"a/f2",
                 e.symlink(b, b"l2", b"../../" + b"y" * 700).ino: b"../../" + b"y" * 700}
    finally:
        e.close()
    out = {ino: ("file", data, xattrs.get(ino, {})) for ino, data in files.items()}
    out.update({ino: ("link", t, {}) for ino, t in links.items()})
    return out


def verify(path: str, expected: dict, victims=()) -> None:
    """Engine mounts the region and every surviving inode reads back as written."""
    e = Engine(path)
    try:
        for ino, (kind, value, xattrs) in expected.items():
            if ino in victims:
                continue
            if kind == "file":
                assert e.stat(ino).size == len(value)
                assert bytes(e.read(ino, 0, len(value) + 10)) == value, f"inode {ino} data differs"
                for k, val in xattrs.items():
                    assert e.getxattr(ino, k) == val
            else:
                assert e.readlink(ino) == value
    finally:
        e.close()


def tree(path: str) -> dict:
    """Everything a user sees, through the Engine: {"paths": {path: ino}, "inodes":
    {ino: {kind, mode, uid, gid, size, nlink, data | target, xattrs}}, "packed": inos}."""
    e = Engine(path)
    try:
        paths: dict[str, int] = {}
        inodes: dict[int, dict] = {}
        todo = [(1, "")]
        while todo:
            d, rel = todo.pop()
            for _, name, ino in e.readdir(d):
                if name in (b".", b".."):
                    continue
                p = f"{rel}/{name.decode(errors='surrogateescape')}"
                paths[p] = ino
                if ino in inodes:
                    continue  # a hard link: described once
                s = e.stat(ino)
                rec = {"kind": s.kind, "mode": s.mode, "uid": s.uid, "gid": s.gid, "nlink": s.nlink,
                       "xattrs": {n: e.getxattr(ino, n) for n in sorted(e.listxattr(ino))}}
                if statmod.S_ISDIR(s.mode):
                    todo.append((ino, p))
                elif statmod.S_ISLNK(s.mode):
                    rec["target"] = e.readlink(ino)
                else:
                    rec["size"] = s.size  # (a damaged size may be absurd: read what a test file can hold)
                    rec["data"] = bytes(e.read(ino, 0, min(s.size, 64 << 20) + 10))
                inodes[ino] = rec
        return {"paths": paths, "inodes": inodes, "packed": set(e.packer.packed) & set(inodes)}
    finally:
        e.close()


def moved_tree(before: dict, damage: str, info: dict) -> dict[str, int]:
    """The paths a repair of this damage must leave: the same, but for what the damage
    cut off the tree (put in /lost+found as "#INO") and a name made invalid (its "/"
    becomes "_"). docs/FSCK.md states these rules."""
    paths = dict(before["paths"])

    def move(ino: int, new: str) -> None:
        (old,) = [p for p, i in paths.items() if i == ino]
        for p in [p for p in paths if p == old or p.startswith(old + "/")]:
            paths[new + p[len(old):]] = paths.pop(p)

    if damage == "orphan-inode":
        move(info["ino"], f"/lost+found/#{info['ino']}")
    elif damage == "dir-cycle":
        move(info["top"], f"/lost+found/#{info['top']}")
    elif damage == "bad-name":
        (old,) = [p for p, i in paths.items() if i == info["ino"] and p.endswith("/" + info["old"])]
        paths[old[: -len(info["old"])] + info["new"].replace("/", "_")] = paths.pop(old)
    return paths


def tree_differences(before: dict, after: dict, want_paths: dict[str, int], victims=()) -> list[str]:
    """What differs between the tree a repair must leave and the one it left."""
    problems = []
    got_paths = dict(after["paths"])
    lf = got_paths.pop("/lost+found", None)
    if any(p.startswith("/lost+found/") for p in want_paths):
        if lf is None or not statmod.S_ISDIR(after["inodes"][lf]["mode"]):
            problems.append("no /lost+found directory")
    elif lf is not None:
        problems.append("a /lost+found nobody needed")
    if got_paths != want_paths:
        problems.append(f"names: missing {sorted(set(want_paths.items()) - set(got_paths.items()))}, "
                        f"unexpected {sorted(set(got_paths.items()) - set(want_paths.items()))}")
    for ino, rec in before["inodes"].items():
        got = after["inodes"].get(ino)
        if got is None:
            problems.append(f"inode {ino} is gone")
            continue
        names = sum(1 for i in got_paths.values() if i == ino)
        if not statmod.S_ISDIR(rec["mode"]) and got["nlink"] != names:
            problems.append(f"inode {ino}: nlink {got['nlink']} but {names} name(s)")
        if ino in victims:
            continue
        for k, v in rec.items():
            if k != "nlink" and got.get(k) != v:
                problems.append(f"inode {ino}: {k} differs")
    return problems


def run_cli(*args: str, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run([FSCK, *args], capture_output=True, text=True, stdin=stdin, timeout=60)


@pytest.fixture
def populated(region_factory):
    path = region_factory()
    return path, populate(path)


def test_fresh_mkfs_is_clean(region_factory):
    for kw in ({}, {"inodes": 100}, {"size": 256 << 20}):
        path = region_factory(**kw)
        rep = fsck(path)
        assert rep.exit_code == 0, [f.message for f in rep.findings]
        assert rep.superblock == "primary" and not rep.live


def test_populated_is_clean_and_y_changes_nothing(populated):
    path, _ = populated
    before = _read(path, 8 << 20)
    assert fsck(path, "y").exit_code == 0
    assert _read(path, 8 << 20) == before


@pytest.mark.parametrize("damage", sorted(corrupt.DAMAGES))
def test_damage_found_repaired_and_mounts(populated, damage, tmp_path):
    path, expected = populated
    was = tree(path)
    assert was["packed"] and any("target" in r for r in was["inodes"].values())
    info = corrupt.apply(path, damage, seed=3)
    rep = fsck(path, "n")
    assert rep.exit_code == 4, (damage, [f.as_dict() for f in rep.findings])
    named = {f.check for f in rep.errors}
    assert corrupt.EXPECTED_CHECK[damage] in named, (damage, named)
    # -n never writes.
    before = _read(path)
    fsck(path, "n")
    assert _read(path) == before
    backup = str(tmp_path / "meta.bak")
    rep = fsck(path, "y", backup=backup)
    assert rep.exit_code == 1, (damage, [f.as_dict() for f in rep.findings if not f.repaired])
    assert any(f.repaired for f in rep.findings)
    assert os.path.getsize(backup) > SB_STRUCT
    with open(backup, "rb") as f:
        assert f.read(SB_STRUCT) == before[:SB_STRUCT]  # saved before the repair
    again = fsck(path, "n")
    assert again.exit_code == 0, [f.as_dict() for f in again.findings]
    verify(path, expected, info["victims"])
    # Names, places in the tree, hard links, xattrs, symlinks and packed files: all as
    # before, but for what this damage must move (its victims may lose data, not names).
    problems = tree_differences(was, tree(path), moved_tree(was, damage, info), info["victims"])
    assert not problems, (damage, info["detail"], problems)


def test_repaired_region_mounts_through_fuse_and_reads_back(populated, mount_factory):
    """fsck -y, then a real mount: every file reads through the kernel as before the
    damage, at the place the repair gave it (cycle cut off into lost+found, name fixed)."""
    path, _ = populated
    was = tree(path)
    cut = corrupt.apply(path, "dir-cycle", seed=3)
    renamed = corrupt.apply(path, "bad-name", seed=5)
    corrupt.apply(path, "link-count", seed=2)
    assert fsck(path, "y").exit_code == 1
    want = moved_tree({"paths": moved_tree(was, "dir-cycle", cut)}, "bad-name", renamed)
    m = mount_factory(path)
    seen = {}
    for top, dirs, files in os.walk(m.path):
        for name in dirs + files:
            p = os.path.join(top, name)
            rel = "/" + os.path.relpath(p, m.path)
            st = os.lstat(p)
            seen[rel] = st.st_ino
            if rel == "/lost+found":
                continue
            rec = was["inodes"][st.st_ino]
            assert st.st_mode == rec["mode"] and (st.st_uid, st.st_gid) == (rec["uid"], rec["gid"]), rel
            if not statmod.S_ISDIR(st.st_mode):  # (directories' counts follow the moves)
                assert st.st_nlink == rec["nlink"], rel
            xattrs = {n.encode(): os.getxattr(p, n, follow_symlinks=False)
                      for n in os.listxattr(p, follow_symlinks=False)}
            assert xattrs == rec["xattrs"], rel
            if statmod.S_ISLNK(st.st_mode):
                assert os.fsencode(os.readlink(p)) == rec["target"], rel
            elif statmod.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    assert f.read() == rec["data"], rel
    assert {p: i for p, i in seen.items() if p != "/lost+found"} == want


def test_mount_refuses_damage_fsck_reports(populated):
    path, _ = populated
    corrupt.apply(path, "journal-truncated", seed=1)
    with pytest.raises(MountError):
        Engine(path)
    assert fsck(path, "p").exit_code == 4  # discarding the journal needs -y
    assert fsck(path, "y").exit_code == 1
    Engine(path).close()


def test_preen_fixes_safe_things_only(populated):
    path, expected = populated
    corrupt.apply(path, "leak-block", seed=1)
    corrupt.apply(path, "link-count", seed=1)
    assert fsck(path, "p").exit_code == 1
    assert fsck(path).exit_code == 0
    corrupt.apply(path, "checksum", seed=2)
    rep = fsck(path, "p")
    assert rep.exit_code == 4 and {f.code for f in rep.errors} == {"checksum"}
    assert fsck(path, "y").exit_code == 1
    verify(path, expected)


def test_interrupted_transaction_rolled_back_like_mount(populated, region_factory):
    path, expected = populated
    # Make a transaction and leave it open: state active with valid undo records.
    from pmemfs.media.format import Superblock, Tables
    from pmemfs.media.journal import Journal
    from pmemfs.media.region import Region

    with Region(path) as r:
        sb = Superblock.decode(r.buf, r.size)
        t = Tables(r.buf, sb)
        j = Journal(r.buf, sb.geometry.data_start_block * BS)
        tx = j.begin()
        ino = next(iter(expected))
        tx.save_record(t.inodes, sb.geometry.offsets["inode"], ino)
        t.inodes["nlink"][ino] = 77  # not sealed: only the rollback makes this right
        del t, tx, j
    rep = fsck(path, "n")
    assert rep.exit_code == 0  # the rolled-back (private) image is clean
    assert [f.code for f in rep.findings] == ["journal-active"]
    rep = fsck(path, "p")
    assert rep.exit_code == 1 and rep.findings[0].repaired
    assert fsck(path).exit_code == 0
    verify(path, expected)


def test_a_rollback_names_the_files_it_changes(populated):
    """The journal keeps the undo records of its last transaction after the commit;
    damage that sets its state word back to active makes fsck (and mount) roll that
    committed transaction back. fsck cannot tell that from a crash, but it names the
    file whose change it undid."""
    path, expected = populated
    e = Engine(path)
    f1 = e.lookup(1, b"f1")
    e.setxattr(f1, b"user.last", b"v")  # the last transaction before the "crash"
    e.region.close()  # no unmount: that would be the last transaction instead
    from pmemfs.media.format import JOURNAL_OFFSET
    from pmemfs.media.journal import HEADER_SIZE

    with open(path, "r+b") as f:
        f.seek(JOURNAL_OFFSET + 24)  # the state word (FORMAT.md, "Journal")
        f.write((1).to_bytes(4, "little"))
        assert HEADER_SIZE == 64
    rep = fsck(path, "y")
    assert rep.exit_code == 1
    (change,) = [c for c in rep.files if c.inode == f1]
    assert change.what == ["rolled-back"] and change.path in ("/c/hardlink", "/f1")
    e = Engine(path)
    try:
        assert b"user.last" not in e.listxattr(f1)
    finally:
        e.close()
    verify(path, expected)


@pytest.mark.parametrize("room", ["copy", "full"])
def test_shared_blocks_of_two_owners_are_quarantined(populated, room):
    """Two sound extents claim one block and their files belong to different users:
    the later claim gets its own copy (or, with no free block left, loses the block),
    and both files are taken out of their directories into /lost+found (root's, 0700),
    named in the report as quarantined: neither user can read the other's data."""
    path, _ = populated
    was = tree(path)
    from pmemfs.media.format import Superblock, Tables, seal
    from pmemfs.media.region import Region

    big = [i for i, rec in was["inodes"].items() if len(rec.get("data", b"")) > BS]  # whole-block files
    with Region(path) as r:  # the first extent of one of them onto the other's first block
        sb = Superblock.decode(r.buf, r.size)
        t = Tables(r.buf, sb)
        slot = {int(t.extents["owner"][k]): k for k in range(sb.hwm["extent"] - 1, 0, -1)
                if int(t.extents["owner"][k]) in big}
        a, b = sorted(slot, key=slot.get)[:2]  # b's extent has the later slot: it is the later claim
        t.extents["start_block"][slot[b]] = t.extents["start_block"][slot[a]]
        seal(t.extents, slot[b])
        del t
    with Region(path) as r:
        sb = Superblock.decode(r.buf, r.size)
        t = Tables(r.buf, sb)
        t.inodes["uid"][b] = 1000
        seal(t.inodes, b)
        if room == "full":  # every free block marked used, as a leak would (fsck frees them after)
            t.bitmap[:] = 0xFF
        del t
    rep = fsck(path, "y")
    assert rep.exit_code == 1, [f.as_dict() for f in rep.errors]
    assert fsck(path, "n").exit_code == 0
    files = {c.inode: c for c in rep.files}
    after = tree(path)
    for ino in (a, b):
        assert "quarantined" in files[ino].what and "moved" in files[ino].what, files[ino]
        assert files[ino].path == f"/lost+found/#{ino}" == next(p for p, i in after["paths"].items() if i == ino)
        assert files[ino].was == sorted(p for p, i in was["paths"].items() if i == ino)
    lf = after["inodes"][after["paths"]["/lost+found"]]
    assert lf["uid"] == 0 and lf["mode"] & 0o777 == 0o700
    assert after["inodes"][a]["data"] == was["inodes"][a]["data"]  # the earlier claim keeps its blocks
    if room == "copy":  # b holds a copy of a's first block (its own, private)
        assert "cloned" in files[b].what and "shared-blocks" in files[a].what
        assert after["inodes"][b]["data"][:BS] == was["inodes"][a]["data"][:BS]
    else:  # no room for a copy: b's claim is dropped, it reads zeros there
        assert "lost-blocks" in files[b].what and "shared-blocks" in files[a].what
        assert after["inodes"][b]["data"][:BS] == bytes(BS)


def test_orphans_and_truncating_are_finished(populated):
    path, expected = populated
    e = Engine(path)
    ino = e.create(1, b"gone", 0o644).ino
    e.write(ino, 0, b"z" * (3 * BS))
    e.ref(ino)
    e.unlink(1, b"gone")  # open and unlinked: an orphan
    big = next(i for i, v in expected.items() if v[0] == "file" and len(v[1]) > 2 * BS)
    from pmemfs.media.format import FLAG_TRUNCATING
    with e.transaction() as tx:  # an interrupted truncate: size cut, blocks still there
        e.save_inode(tx, big)
        e.I["size"][big] = 10
        e.I["flags"][big] |= FLAG_TRUNCATING
    e.region.close()  # a crash: no clean unmount
    rep = fsck(path, "n")
    assert rep.exit_code == 0
    assert {"orphan", "truncating"} <= {f.code for f in rep.findings}
    assert fsck(path, "p").exit_code == 1
    assert fsck(path).exit_code == 0
    expected[big] = ("file", expected[big][1][:10], expected[big][2])
    verify(path, expected)


def test_backup_superblock_used_when_primary_dies(populated):
    path, expected = populated
    with open(path, "r+b") as f:
        f.write(b"\0" * SB_STRUCT)
    with pytest.raises(MountError):
        Engine(path)
    rep = fsck(path, "n")
    assert rep.superblock == "backup" and rep.exit_code == 4
    assert fsck(path, "p").exit_code == 1
    assert fsck(path).exit_code == 0
    verify(path, expected)


def test_damaged_backup_superblock_rewritten(populated):
    path, _ = populated
    rep = fsck(path)
    from pmemfs.media.format import Superblock
    with open(path, "r+b") as f:
        sb = Superblock.decode(f.read(SB_STRUCT))
        f.seek(sb.geometry.backup_offset + 100)
        f.write(b"garbage")
    rep = fsck(path)
    assert rep.exit_code == 4 and rep.errors[0].check == "backup-superblock"
    assert fsck(path, "p").exit_code == 1
    assert fsck(path).exit_code == 0


def test_no_superblock_at_all_is_uncorrectable(region_factory):
    path = region_factory()
    with open(path, "r+b") as f:
        f.write(b"\0" * (8 << 20))
    rep = fsck(path, "y")
    assert rep.exit_code == 4 and rep.superblock is None
    with pytest.raises((MountError, FormatError)):
        Engine(path)


def test_lost_found_created_and_reused(populated):
    path, expected = populated
    was = tree(path)
    first = corrupt.apply(path, "orphan-inode", seed=1)
    second = corrupt.apply(path, "orphan-inode", seed=2)
    assert first["ino"] != second["ino"]
    assert fsck(path, "p").exit_code == 1
    e = Engine(path)
    try:
        lf = e.lookup(1, b"lost+found")
        assert len(e.readdir(lf)) == 2 + 2
    finally:
        e.close()
    verify(path, expected)
    # Both in the one /lost+found, each as "#INO", with everything else where it was.
    want = moved_tree({"paths": moved_tree(was, "orphan-inode", first)}, "orphan-inode", second)
    assert not tree_differences(was, tree(path), want)


def test_random_damage_never_crashes(region_factory):
    """Random bytes in the used metadata: fsck and mount fail only with their one-line errors."""
    template = region_factory()
    populate(template)
    with open(template, "rb") as f:
        image = f.read(8 << 20)  # metadata + the few data blocks used
    size = os.path.getsize(template)
    path = region_factory()
    outcomes = {0: 0, 1: 0, 4: 0}
    for seed in range(200):
        with open(path, "r+b") as f:
            f.write(image)
            f.truncate(size)
        corrupt.random_bytes(path, seed, writes=random.Random(seed).choice([1, 2, 4, 8]))
        rep = fsck(path, "n")
        assert rep.exit_code in (0, 4)
        mounted = _try_mount(path)
        if rep.exit_code == 0:
            assert mounted, f"seed {seed}: fsck says clean but mount refuses"
            _restore(path, image, size)
            corrupt.random_bytes(path, seed, writes=random.Random(seed).choice([1, 2, 4, 8]))
        rep = fsck(path, "y")
        outcomes[rep.exit_code] += 1
        if rep.exit_code == 4:
            assert not _try_mount(path), f"seed {seed}: fsck -y gave up but mount accepts it"
        else:
            again = fsck(path, "n")
            assert again.exit_code == 0, (seed, [f.as_dict() for f in again.findings])
            assert _try_mount(path), f"seed {seed}: repaired but mount refuses"
    assert outcomes[1] > 100  # most random damage is found and repaired


def test_random_damage_changes_no_file_silently(region_factory):
    """Issue 14's rule: after random damage to the used metadata (random bytes, or
    flipped bits, in the superblock, journal header, bitmap and the used records of
    every table) and fsck -y, every file reads exactly as before the damage (data,
    size, kind, mode, owner, xattrs, symlink target, every name), or the report names
    it: an entry in its per-file list (the JSON "files") with its inode and, while it
    has a name, one of its paths, and a CHANGED line in the text. damage_loop.unexplained
    is the judge; tools/damage_loop.py runs the same over many more seeds."""
    template = region_factory()
    damage_loop.populate(template)
    tpl = damage_loop.Template(template)
    path = region_factory()
    stats = damage_loop.new_stats()
    broken = {}
    seeds = 40
    for seed in range(seeds):
        problems = damage_loop.one_seed(path, tpl, seed, stats, thorough=False)
        if problems:
            broken[seed] = problems
    assert not broken, f"{len(broken)} seeds changed files silently: {dict(list(broken.items())[:5])}"
    # Not vacuous: the damage is repaired, it does change files (named), most seeds end
    # with every file as it was (records restored exactly), and fsck does not simply
    # name every file (there are 30 here: that would be over a thousand names).
    assert stats["repaired"] >= seeds - 5, stats
    assert stats["changed"] > 0 and stats["named"] >= stats["changed"] - stats["named_unchanged"], stats
    assert stats["untouched"] >= seeds // 2 and stats["restored"] > seeds, stats
    assert stats["named"] < 4 * seeds, stats


def test_every_changed_file_named_with_what_happened(populated):
    """The per-file list, in the report and in --json, for damage whose outcome is
    known: a file whose extent points at another file's blocks (each gets a copy, both
    named), a lost name (moved to lost+found, named by its new path), an inode record
    with a damaged owner (kept, named unverified), a name made invalid (renamed)."""
    path, expected = populated
    was = tree(path)
    overlap = corrupt.apply(path, "extent-overlap", seed=3)
    cut = corrupt.apply(path, "orphan-inode", seed=1)
    renamed = corrupt.apply(path, "bad-name", seed=5)
    victim = next(i for i, p in sorted((i, p) for p, i in was["paths"].items())
                  if i not in (overlap["victims"][0], cut["ino"], renamed["ino"]) and p.count("/") == 1
                  and "data" in was["inodes"][i])
    from pmemfs.media.format import Superblock, Tables
    from pmemfs.media.region import Region

    with Region(path) as r:  # the owner field of one inode record, not resealed
        sb = Superblock.decode(r.buf, r.size)
        t = Tables(r.buf, sb)
        t.inodes["uid"][victim] = 4242
        del t
    p = run_cli("-y", "--json", path)
    assert p.returncode == 1, p.stderr
    rep = json.loads(p.stdout)
    files = {f["inode"]: f for f in rep["files"]}
    for f in rep["files"]:
        assert set(f) == {"path", "inode", "paths", "was", "what", "details"} and f["what"] and f["details"]
    after = tree(path)

    def paths(ino):
        return sorted(q for q, i in after["paths"].items() if i == ino)

    b = overlap["victims"][0]
    assert "cloned" in files[b]["what"] and files[b]["path"] in paths(b)
    others = [i for i, f in files.items() if "shared-blocks" in f["what"]]
    assert others and all(after["inodes"][i]["data"] == was["inodes"][i]["data"] for i in others)
    lost = cut["ino"]
    assert "moved" in files[lost]["what"] and files[lost]["path"] == f"/lost+found/#{lost}"
    assert "renamed" in files[renamed["ino"]]["what"] and files[renamed["ino"]]["path"] in paths(renamed["ino"])
    assert "unverified" in files[victim]["what"] and after["inodes"][victim]["uid"] == 4242
    assert files[victim]["path"] in paths(victim) and files[victim]["was"] == paths(victim)
    # The text report says the same, one CHANGED line per file.
    text = run_cli("-n", path)
    assert text.returncode == 0 and "CHANGED" not in text.stdout  # -n changes nothing, names nothing
    corrupt.apply(path, "link-count", seed=1)
    p = run_cli("-y", path)
    lines = [line for line in p.stdout.splitlines() if line.startswith("CHANGED: ")]
    assert len(lines) == 1 and "(inode " in lines[0] and ": names: " in lines[0], p.stdout
    assert "1 file(s) changed" in p.stdout.splitlines()[-1]
    verify(path, expected, {b, victim})


def _restore(path: str, image: bytes, size: int) -> None:
    with open(path, "r+b") as f:
        f.write(image)
        f.truncate(size)


def _try_mount(path: str) -> bool:
    try:
        e = Engine(path)
    except (MountError, FormatError, RegionError):
        return False
    e.close()
    return True


def test_random_damage_cli_no_traceback(region_factory):
    path = region_factory()
    populate(path)
    for seed in range(5):
        corrupt.random_bytes(path, 1000 + seed, writes=6)
        for args in (["-n"], ["--json", "-n"], ["-y"], ["-n", "-v"]):
            p = run_cli(*args, path)
            assert "Traceback" not in p.stderr + p.stdout
            assert p.returncode in (0, 1, 4), p.stderr
            if "--json" in args:
                rep = json.loads(p.stdout)
                assert rep["exit_code"] == p.returncode
                for f in rep["findings"]:
                    assert set(f) >= {"check", "severity", "object", "message", "repaired"}
                for f in rep["files"]:
                    assert set(f) == {"path", "inode", "paths", "was", "what", "details"}


@pytest.mark.parametrize("args", [["-n", "-y"], ["-p", "-y"], ["--bogus"], [], ["-n", "a", "b"]])
def test_usage_errors_one_line_exit_16(args):
    p = run_cli(*args)
    assert p.returncode == 16, (p.returncode, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_cannot_open_is_exit_8(tmp_path):
    p = run_cli(str(tmp_path / "nothing"))
    assert p.returncode == 8 and len(p.stderr.strip().splitlines()) == 1
    with pytest.raises(RegionError):
        fsck(str(tmp_path / "nothing"))


def test_cli_exit_codes_and_json(populated):
    path, _ = populated
    p = run_cli("-v", path)
    assert p.returncode == 0 and "check tree: 0 finding(s)" in p.stdout
    corrupt.apply(path, "link-count", seed=1)
    p = run_cli("--json", path)
    rep = json.loads(p.stdout)
    assert p.returncode == 4 and rep["exit_code"] == 4 and rep["mode"] == "n"
    assert any(f["check"] == "links" and not f["repaired"] for f in rep["findings"])
    p = run_cli("-p", "--json", path)
    assert p.returncode == 1 and any(f["repaired"] for f in json.loads(p.stdout)["findings"])
    assert run_cli(path).returncode == 0
    fs = subprocess.run([os.path.join(os.path.dirname(FSCK), "fsck.pmemfs"), "-a", path],
                        capture_output=True, text=True, timeout=60)
    assert fs.returncode == 0


def test_repair_refused_while_locked_but_n_allowed(populated):
    path, _ = populated
    code = ("import sys; from pmemfs.fs.engine import Engine; e = Engine(sys.argv[1]); "
            "print('ready', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        p = run_cli("-y", path)
        assert p.returncode == 8 and str(holder.pid) in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        p = run_cli("-n", "--json", path)
        rep = json.loads(p.stdout)
        assert rep["live"] and rep["holder_pid"] == holder.pid
        assert p.returncode == 0, rep
        p = run_cli("-n", path)
        assert "live image" in p.stdout
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_repair_is_journaled(populated):
    """A repair transaction cut short is rolled back by the next fsck (or mount)."""
    path, expected = populated
    corrupt.apply(path, "link-count", seed=4)
    from pmemfs.media.format import Superblock
    from pmemfs.media.region import Region

    r_before = _read(path, 8 << 20)
    with Region(path) as region:
        sb = Superblock.decode(region.buf, region.size)
        rep = fsckmod.Repair(region.buf, sb, dict(sb.hwm))
        fsckmod.fix_nlink(rep, [])
        assert rep.tx is not None  # open, not committed: as if fsck died here
        rep.tx = None
        del rep
    assert _read(path, 8 << 20) != r_before
    again = fsck(path, "n")
    assert "journal-active" in {f.code for f in again.findings}
    assert "links" in {f.check for f in again.errors}  # rolled back: the damage is still there
    assert fsck(path, "y").exit_code == 1
    verify(path, expected)


def test_check_runs_in_o_metadata(region_factory):
    """A big sparse region with few files: fsck touches only what is used (no timing)."""
    path = region_factory(size=64 << 30)
    e = Engine(path)
    e.create(1, b"f", 0o644)
    e.close()
    rep = fsck(path)
    assert rep.exit_code == 0
    assert os.stat(path).st_blocks * 512 < 64 << 20  # still sparse after the check


def test_backup_file_matches_metadata(populated, tmp_path):
    path, _ = populated
    dest = str(tmp_path / "m")
    fsck(path, "n", backup=dest)
    from pmemfs.media.format import Superblock
    with open(path, "rb") as f:
        sb = Superblock.decode(f.read(SB_STRUCT))
        g = sb.geometry
        f.seek(0)
        meta = f.read(g.data_start_block * g.block_size)
    with open(dest, "rb") as f:
        assert f.read() == meta


def _slow_open(path: str) -> list[str]:
    """strace prefix that delays fsck's first open of the region by 1.5 s: slow work, as
    a slow device or a loaded machine makes it (the checks themselves take milliseconds)."""
    strace = shutil.which("strace")
    assert strace, "strace is needed (./run installs it)"
    return [strace, "-qq", "-o", "/dev/null", "-P", path, "-e", "trace=openat",
            "-e", "inject=openat:delay_exit=1500000:when=1"]


def _on_terminal(cmd: list[str]) -> tuple[int, str, bytes]:
    """Run cmd with stderr on a pseudo-terminal, stdout on a pipe: (status, stdout, terminal)."""
    master, slave = os.openpty()
    try:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    finally:
        os.close(slave)
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last holder of the terminal closed it
                break
            if not chunk:
                break
            seen += chunk
        out = p.stdout.read().decode()
        p.wait(timeout=60)
    finally:
        os.close(master)
    return p.returncode, out, seen


def _elapsed(report_line: str) -> float:
    return float(report_line.rsplit(", ", 1)[1].split(" s)")[0])


def test_progress_bar_on_a_terminal_only_when_slow(populated):
    path, _ = populated
    code, out, tty = _on_terminal([FSCK, "-n", path])
    assert code == 0, out
    assert _elapsed(out) < 1.0, out  # fast work (this region checks in milliseconds) ...
    assert tty == b"", tty  # ... draws nothing
    code, out, tty = _on_terminal([*_slow_open(path), FSCK, "-n", path])
    assert code == 0, out
    assert _elapsed(out) > 1.0, out
    text = tty.decode(errors="replace")
    assert "checking" in text and f"{len(fsckmod.check.CHECK_NAMES)}/{len(fsckmod.check.CHECK_NAMES)}" in text, text
    assert "checks" in text and "bytes" not in text, text  # it counts checks
    # The report on stdout is only the report: the bar went to the terminal it asked about.
    assert out.splitlines() == [out.strip()] and "\x1b" not in out, repr(out)
    # Slow, but stderr is not a terminal: no bar.
    p = subprocess.run([*_slow_open(path), FSCK, "-n", path], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and _elapsed(p.stdout) > 1.0, p.stdout
    assert p.stderr == "", p.stderr


def _read(path: str, n: int = -1) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def test_posix_acls_are_xattrs_fsck_keeps(region_factory):
    """system.posix_acl_* are the two system names pmemfs serves: fsck must find
    nothing wrong with them (a namespace check once took them for damage)."""
    from pmemfs.fs import acl
    from pmemfs.fs.engine import Engine

    path = region_factory()
    e = Engine(path)
    e.acl = True  # what the daemon sets once the kernel agreed to POSIX ACLs
    d = e.mkdir(1, b"d", 0o755).ino
    entries = [(acl.USER_OBJ, 7, acl.UNDEFINED_ID), (acl.USER, 5, 65534), (acl.GROUP_OBJ, 5, acl.UNDEFINED_ID),
               (acl.MASK, 5, acl.UNDEFINED_ID), (acl.OTHER, 0, acl.UNDEFINED_ID)]
    for name in acl.NAMES:
        e.setxattr(d, name, acl.encode(entries))
    e.close()
    rep = fsck(path, "n")
    assert rep.exit_code == 0 and not rep.findings, [f.message for f in rep.findings]
    rep = fsck(path, "y")
    assert rep.exit_code == 0
    e = Engine(path, readonly=True)
    assert all(e.getxattr(d, name) == acl.encode(entries) for name in acl.NAMES)
    e.close()
