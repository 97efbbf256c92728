"""The churn phase of tools/soak.py: fsstress-like namespace churn from several processes,
each checked against a model of its own directory, all racing in one shared directory."""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import random
import stat

import conftest
from soak_common import Problem, Round, _pwrite, _write_new, check, run_workers, unmount_check


class Node:
    __slots__ = ("data", "kind", "target", "xattrs")

    def __init__(self, kind: str, data: bytes = b"", target: str = ""):
        self.kind, self.data, self.target, self.xattrs = kind, bytearray(data), target, {}


def _parent(p: str) -> str:
    return p.rpartition("/")[0]


def _join(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


def _under(p: str, d: str) -> bool:
    return p == d or p.startswith(d + "/")


def expected_tree(names: dict[str, Node]) -> dict:
    """What a walk of the tree must find (see observed_tree)."""
    out: dict = {}
    links = collections.Counter(id(n) for n in names.values())
    for p, n in names.items():
        if n.kind == "f":
            out[p] = ("f", links[id(n)], hashlib.sha256(n.data).hexdigest()[:16], sorted(n.xattrs.items()))
        elif n.kind == "d":
            subdirs = sum(1 for q, c in names.items() if c.kind == "d" and _parent(q) == p)
            out[p] = ("d", 2 + subdirs, sorted(n.xattrs.items()))
        else:
            out[p] = ("l", n.target)
    groups: dict[int, list[str]] = collections.defaultdict(list)
    for p, n in names.items():
        if links[id(n)] > 1:
            groups[id(n)].append(p)
    out["<links>"] = sorted(sorted(g) for g in groups.values())
    return out


def observed_tree(root: str) -> dict:
    out: dict = {}
    groups: dict[int, list[str]] = collections.defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(full))
                continue
            xattrs = sorted((x, os.getxattr(full, x, follow_symlinks=False))
                            for x in os.listxattr(full, follow_symlinks=False))
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", st.st_nlink, xattrs)
            else:
                with open(full, "rb") as f:
                    out[rel] = ("f", st.st_nlink, hashlib.sha256(f.read()).hexdigest()[:16], xattrs)
                groups[st.st_ino].append(rel)
    out["<links>"] = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    return out


SHARED = ["a", "b", "c", "a/a", "a/b", "b/a", "b/c", "c/a", "a/a/a"]
SHARED_OK = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR, errno.EINVAL, errno.ELOOP,
             errno.ENODATA, errno.EPERM}


def _outcome(fn, *args) -> str:
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


CHURN_OPS = {"create": 15, "mkdir": 8, "symlink": 5, "link": 7, "unlink": 10, "rmdir": 6, "rename": 22,
             "setxattr": 8, "removexattr": 4, "write": 10, "truncate": 5, "shared": 20}
Step = tuple[str, str, str]  # (what the call gave, what the model says, a description)


class ChurnModel:
    """One worker's private directory and the model of it. Each operation draws from rng
    in a fixed order (a seed replays the same calls), does the call, updates the model and
    returns a Step, or None when there was nothing to do it on."""

    def __init__(self, rng: random.Random, root: str):
        self.rng, self.root = rng, root
        self.names: dict[str, Node] = {}
        self.serial = 0

    def fresh(self, kind: str) -> str:
        self.serial += 1
        d = self.rng.choice([""] + [p for p, n in self.names.items() if n.kind == "d"])
        return _join(d, f"{kind}{self.serial}")

    def a(self, p: str) -> str:
        return os.path.join(self.root, p)

    def step(self, op: str) -> Step | None:
        rng, names = self.rng, self.names
        files = [p for p, x in names.items() if x.kind == "f"]
        dirs = [p for p, x in names.items() if x.kind == "d"]
        others = [p for p, x in names.items() if x.kind != "d"]
        if op in ("create", "mkdir", "symlink"):
            return self.make(op)
        if op == "link" and files and rng.random() < 0.95:
            src, p = rng.choice(files), self.fresh("h")
            got = _outcome(os.link, self.a(src), self.a(p))
            names[p] = names[src]
            return got, "ok", f"link {src} {p}"
        if op == "link" and dirs:
            src = rng.choice(dirs)
            return _outcome(os.link, self.a(src), self.a(src + ".link")), "EPERM", f"link of directory {src}"
        if op == "unlink" and others and rng.random() < 0.95:
            p = rng.choice(others)
            got = _outcome(os.unlink, self.a(p))
            del names[p]
            return got, "ok", f"unlink {p}"
        if op in ("unlink", "rmdir") and dirs:
            return self.remove_dir(op, rng.choice(dirs))
        if op == "rename":
            return self.rename()
        if op in ("setxattr", "removexattr"):
            return self.xattr(op, files + dirs)
        if op in ("write", "truncate") and files:
            return self.write(op, rng.choice(files))
        return None

    def make(self, op: str) -> Step:
        rng = self.rng
        if op == "create":
            p = self.fresh("f")
            data = rng.randbytes(rng.choice([0, rng.randint(1, 4096), rng.randint(4096, 100_000)]))
            got = _outcome(_write_new, self.a(p), data)
            self.names[p] = Node("f", data)
        elif op == "mkdir":
            p = self.fresh("d")
            got = _outcome(os.mkdir, self.a(p))
            self.names[p] = Node("d")
        else:
            p = self.fresh("l")
            target = rng.choice([*self.names, "nowhere/x"])
            got = _outcome(os.symlink, target, self.a(p))
            self.names[p] = Node("l", target=target)
        return got, "ok", op

    def remove_dir(self, op: str, p: str) -> Step:
        empty = not any(_parent(q) == p for q in self.names)
        if op == "unlink":
            return _outcome(os.unlink, self.a(p)), "EISDIR", f"{op} {p}"
        got, want = _outcome(os.rmdir, self.a(p)), "ok" if empty else "ENOTEMPTY"
        if empty:
            del self.names[p]
        return got, want, f"{op} {p}"

    def rename(self) -> Step | None:
        rng, names = self.rng, self.names
        src = rng.choice(list(names))
        node = names[src]
        if rng.random() < 0.6:  # to a new name, maybe into its own subtree
            dst = self.fresh(node.kind)
            bad = node.kind == "d" and _under(_parent(dst), src)
            got, want = _outcome(os.rename, self.a(src), self.a(dst)), "EINVAL" if bad else "ok"
            if not bad:
                _move(names, src, dst)
            return got, want, f"rename {src} {dst}"
        # Over an existing name that is neither above nor below it.
        cands = [q for q in names if q != src and not _under(q, src) and not _under(src, q)]
        if not cands:
            return None
        dst = rng.choice(cands)
        victim = names[dst]
        want = "ok"
        if victim is node:
            want = "ok"  # two names of one file: nothing happens
        elif node.kind == "d" and victim.kind != "d":
            want = "ENOTDIR"
        elif node.kind != "d" and victim.kind == "d":
            want = "EISDIR"
        elif node.kind == "d" and any(_parent(q) == dst for q in names):
            want = "ENOTEMPTY"
        got = _outcome(os.rename, self.a(src), self.a(dst))
        if want == "ok" and victim is not node:
            for q in [q for q in names if _under(q, dst)]:
                del names[q]
            _move(names, src, dst)
        return got, want, f"rename {src} {dst}"

    def xattr(self, op: str, cands: list[str]) -> Step | None:
        if not cands:
            return None
        rng = self.rng
        p = rng.choice(cands)
        key = f"user.k{rng.randrange(4)}"
        xattrs = self.names[p].xattrs
        if op == "setxattr":
            value = rng.randbytes(rng.randint(1, 200))
            got, want = _outcome(os.setxattr, self.a(p), key, value), "ok"
            xattrs[key] = value
        else:
            want = "ok" if key in xattrs else "ENODATA"
            got = _outcome(os.removexattr, self.a(p), key)
            xattrs.pop(key, None)
        return got, want, f"{op} {p} {key}"

    def write(self, op: str, p: str) -> Step:
        rng, node = self.rng, self.names[p]
        if op == "write":
            off = rng.randint(0, min(len(node.data) + 100, 200_000))
            data = rng.randbytes(rng.randint(1, 20_000))
            got = _outcome(_pwrite, self.a(p), data, off)
            node.data.extend(bytes(max(off + len(data) - len(node.data), 0)))
            node.data[off:off + len(data)] = data
        else:
            size = rng.randint(0, 150_000)
            got = _outcome(os.truncate, self.a(p), size)
            del node.data[size:]
            node.data.extend(bytes(size - len(node.data)))
        return got, "ok", f"{op} {p}"


def churn_worker(mount: str, wid: int, seed: int, nops: int, cap: int) -> tuple[dict, dict]:
    """Namespace churn in mount/pWID by a model (every outcome must be the model's), and
    in mount/shared with everyone else (only a racing caller's errors allowed). Returns
    the tree the model expects and counts of operations."""
    rng = random.Random(seed * 100 + wid)
    root = os.path.join(mount, f"p{wid}")
    shared = os.path.join(mount, "shared")
    os.makedirs(root)
    model = ChurnModel(rng, root)
    count: collections.Counter = collections.Counter()
    for n in range(1, nops + 1):
        op = rng.choices(list(CHURN_OPS), list(CHURN_OPS.values()))[0]
        if len(model.names) > cap and op in ("create", "mkdir", "symlink", "link"):
            op = rng.choice(("unlink", "rmdir"))
        if op == "shared":
            _shared_op(rng, shared, count)
            continue
        if not model.names:
            op = "create"
        done = model.step(op)
        if done is None:
            continue
        got, want, desc = done
        count[op] += 1
        if got != want:
            raise AssertionError(f"p{wid} op {n} ({desc}): got {got}, the model says {want}")
    return expected_tree(model.names), dict(count)


def _move(names: dict[str, Node], src: str, dst: str) -> None:
    for q in sorted((q for q in names if _under(q, src)), key=len):
        names[dst + q[len(src):]] = names.pop(q)


def _shared_op(rng: random.Random, shared: str, count: collections.Counter) -> str:
    p = os.path.join(shared, rng.choice(SHARED))
    q = os.path.join(shared, rng.choice(SHARED))
    op = rng.choice(("create", "mkdir", "mkdir", "rename", "rename", "unlink", "rmdir", "link", "symlink",
                     "setxattr", "write"))
    fns = {"create": lambda: _write_new(p, b"s" * rng.randint(0, 5000)), "mkdir": lambda: os.mkdir(p),
           "rename": lambda: os.rename(p, q), "unlink": lambda: os.unlink(p), "rmdir": lambda: os.rmdir(p),
           "link": lambda: os.link(p, q), "symlink": lambda: os.symlink(rng.choice(SHARED), p),
           "setxattr": lambda: os.setxattr(p, "user.s", b"v"), "write": lambda: _pwrite(p, b"w", 10)}
    try:
        fns[op]()
        count["shared ok"] += 1
    except OSError as e:
        if e.errno not in SHARED_OK:
            raise AssertionError(f"shared {op} {p} {q}: {e}") from None
        count["shared refused"] += 1
    return op


def consistency(root: str) -> list[str]:
    """What holds of any tree, whoever made it: directory link counts, '..', file link
    counts, every file readable to its size, xattrs and symlinks readable."""
    problems = []
    names_of: collections.Counter = collections.Counter()
    nlink: dict[int, int] = {}
    todo = [root]
    while todo:
        d = todo.pop()
        subdirs = 0
        with os.scandir(d) as it:
            entries = list(it)
        for e in entries:
            s = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(s.st_mode):
                subdirs += 1
                todo.append(e.path)
                if os.stat(os.path.join(e.path, "..")).st_ino != os.lstat(d).st_ino:
                    problems.append(f"{e.path}: '..' is not its parent")
            elif stat.S_ISLNK(s.st_mode):
                os.readlink(e.path)
            else:
                names_of[s.st_ino] += 1
                nlink[s.st_ino] = s.st_nlink
                with open(e.path, "rb") as f:
                    if len(f.read()) != s.st_size:
                        problems.append(f"{e.path}: a read gives other than st_size {s.st_size} bytes")
            if not stat.S_ISLNK(s.st_mode):
                for x in os.listxattr(e.path):
                    os.getxattr(e.path, x)
        if os.lstat(d).st_nlink != 2 + subdirs:
            problems.append(f"{d}: {os.lstat(d).st_nlink} links with {subdirs} subdirectories")
    for ino, n in names_of.items():
        if nlink[ino] != n:
            problems.append(f"inode {ino}: st_nlink {nlink[ino]} but {n} names")
    return problems


def inodes_used(path: str) -> int:
    s = os.statvfs(path)
    return s.f_files - s.f_ffree


def phase_churn(r: Round) -> str:
    s = r.scale
    m = r.mount(r.region(s.churn_region))
    base = inodes_used(m.path)
    os.mkdir(m.p("shared"))
    for d in ("a", "b", "c"):
        os.mkdir(m.p("shared", d))
    res = run_workers(r.janitor, [(f"p{w}", churn_worker, (m.path, w, r.seed, s.churn_ops, s.churn_cap))
                                  for w in range(s.churn_workers)])
    count: collections.Counter = collections.Counter()
    for w in range(s.churn_workers):
        want, c = res[f"p{w}"]
        count.update(c)
        got = observed_tree(m.p(f"p{w}"))
        if got != want:
            diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            raise Problem(f"p{w}'s tree differs from its model at {diff[:4]}: "
                          f"got {[got.get(k) for k in diff[:2]]}, model {[want.get(k) for k in diff[:2]]}")
    bad = consistency(m.path)
    check(not bad, f"inconsistent tree: {bad[:3]}")
    # Every inode in use is in the tree once the kernel has forgotten the removed ones.
    live = len({os.lstat(os.path.join(d, n)).st_ino for d, ds, fs in os.walk(m.path) for n in ds + fs})
    check(conftest.wait_for(lambda: inodes_used(m.path) == base + live, 20),
          f"{inodes_used(m.path) - base} inodes in use, {live} in the tree (leak)")
    before = observed_tree(m.path)
    m.unmount()
    m.start()
    after = observed_tree(m.path)
    check(after == before, "the tree changed across an unmount and a new mount: "
                           f"{sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))[:4]}")
    unmount_check(m)
    ops = sum(v for k, v in count.items() if not k.startswith("shared"))
    r.numbers.update(ops=ops, shared=count["shared ok"] + count["shared refused"], entries=len(before) - 1)
    return (f"{s.churn_workers} processes, {ops} modelled calls (every outcome as the model said: "
            f"{count['rename']} rename, {count['link']} link, {count['rmdir']} rmdir...), "
            f"{count['shared ok'] + count['shared refused']} racing calls in a shared directory "
            f"({count['shared refused']} refused as allowed); trees equal their models, tree consistent, "
            f"no inode leaked, same after remount, {len(before) - 1} entries")
