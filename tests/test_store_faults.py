"""Local store under faults: every one ends as a miss plus a counted reason, never a
crash and never wrong bytes. Multi-process writers and readers share one directory."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from blend.store import disk as disk_mod
from blend.store import open_store

FP = "f" * 64


def key(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def kv(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, n, 2, 64, generator=g).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))

REPO = Path(__file__).resolve().parents[1]


def _store(root: Path, fp: str = FP, memory: int = 1):
    # memory_bytes=1: nothing fits in memory, every read exercises the disk tier
    return open_store({"path": str(root), "memory_bytes": memory, "disk_bytes": 1 << 30}, fp)


def _py(code: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "BLEND_LOG_LEVEL": "ERROR"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture
def filled(tmp_path):
    s = _store(tmp_path)
    k, x = key("victim"), kv(300, torch.bfloat16)
    assert s.put(k, x)
    return s, k, x


def _miss_counted(s, k, x, reason):
    assert s.get(k) is None
    assert not s.load(k, torch.empty_like(x))
    assert s.fetch(k) is None  # the serving path's read
    st = s.stats()
    assert st["errors"].get(reason, 0) == 3, st["errors"]
    assert st["misses"] >= 3


def test_truncated_file(filled):
    s, k, x = filled
    p = s.disk.path(k)
    os.truncate(p, os.path.getsize(p) - 1000)
    _miss_counted(s, k, x, "truncated")
    os.truncate(p, 40)  # inside the header
    assert s.get(k) is None and s.stats()["errors"]["truncated"] == 4


@pytest.mark.parametrize("where, reason", [("payload", "checksum"), ("header", "checksum"),
                                           ("magic", "bad_header")])
def test_flipped_bytes(filled, where, reason):
    s, k, x = filled
    p = s.disk.path(k)
    raw = bytearray(p.read_bytes())
    off = {"payload": len(raw) - 12345, "header": 60, "magic": 0}[where]
    raw[off] ^= 0x10
    p.write_bytes(bytes(raw))
    _miss_counted(s, k, x, reason)


def test_wrong_fingerprint(filled, tmp_path):
    _, k, x = filled
    other = _store(tmp_path, fp="e" * 64)
    _miss_counted(other, k, x, "fingerprint")


def test_entry_under_another_key(filled):
    s, k, x = filled
    k2 = key("elsewhere")
    s.disk.path(k2).parent.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(s.disk.path(k), s.disk.path(k2))
    _miss_counted(s, k2, x, "wrong_key")


def test_directory_deleted_while_running(filled):
    s, k, x = filled
    shutil.rmtree(s.disk.root)
    assert s.lookup([k]) == [False]
    _miss_counted(s, k, x, "dir_missing")
    assert s.put(k, x)  # the store recreates its directory (0700) and carries on
    got = s.get(k)
    assert got is not None and same(got, x)


def test_permission_denied(filled, monkeypatch):
    s, k, x = filled
    real_open = os.open

    def deny(path, flags, *a):
        if str(path).startswith(str(s.disk.root)):
            raise PermissionError(errno.EACCES, "Permission denied (injected)", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(disk_mod, "_open", deny)
    _miss_counted(s, k, x, "permission")
    assert not s.put(key("new"), x)
    assert s.stats()["errors"]["permission"] == 4
    monkeypatch.undo()
    assert same(s.get(k), x)  # nothing was damaged


def test_disk_full_via_file_size_limit(tmp_path):
    code = """
        import json, resource, signal, sys, torch, hashlib
        from blend.store import open_store
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        s = open_store({"path": sys.argv[1], "memory_bytes": 1}, "f" * 64)
        k = lambda t: hashlib.sha256(t.encode()).hexdigest()
        big = torch.ones(4, 2, 512, 4, 64, dtype=torch.float16)    # 4 MiB > limit
        small = torch.ones(2, 2, 16, 2, 64, dtype=torch.float16)   # 16 KiB
        r = {"big": s.put(k("big"), big), "small": s.put(k("small"), small),
             "get_big": s.get(k("big")) is not None, "get_small": s.get(k("small")) is not None}
        r["errors"] = s.stats()["errors"]
        print(json.dumps(r))
    """
    p = _py(code, str(tmp_path))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert r == {"big": False, "small": True, "get_big": False, "get_small": True,
                 "errors": {"disk_full": 1}}, r
    assert list((tmp_path / "tmp").iterdir()) == []  # the partial temp file was removed
    s = _store(tmp_path)
    assert s.get(key("big")) is None and s.get(key("small")) is not None
    assert s.stats()["errors"] == {}


WRITER = """
    import sys, torch, hashlib
    from blend.store import open_store
    s = open_store({"path": sys.argv[1], "memory_bytes": 1}, "f" * 64)
    i = int(sys.argv[2])
    while True:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(8, 2, 512, 4, 64, generator=g).to(torch.bfloat16)  # 8 MiB
        s.put(hashlib.sha256(f"w{i}".encode()).hexdigest(), x)
        print(i, flush=True)
        i += 1
"""


def _expected(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 2, 512, 4, 64, generator=g).to(torch.bfloat16)


def test_writer_killed_mid_write_leaves_no_partial_entry(tmp_path):
    start = 0
    for round_ in range(3):
        p = _py(WRITER, str(tmp_path), str(start))
        deadline = time.time() + 60
        # wait until this writer has published one entry and the next write is in flight
        while time.time() < deadline and not (
                len(list(tmp_path.glob("*/*.kv"))) > round_
                and any((tmp_path / "tmp").glob("*.tmp"))):
            time.sleep(0.001)
        time.sleep(0.002 * round_)
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate()
        done = [int(x) for x in out.split()]
        start = (done[-1] + 2) if done else start + 1
    s = _store(tmp_path)
    published = sorted(tmp_path.glob("*/*.kv"))
    assert published, "the writers published nothing"
    names = {f"w{i}": i for i in range(start + 5)}
    for f in published:
        i = next(i for n, i in names.items() if key(n) == f.stem)
        got = s.get(f.stem)
        assert got is not None and same(got, _expected(i)), f"entry w{i} is damaged"
    assert s.stats()["errors"] == {}
    # the killed writers' temp files are invisible, and swept once their pid is gone
    assert s.lookup([key(f"w{i}") for i in range(start)]).count(True) == len(published)
    s.disk._sweep_tmp()
    assert list((tmp_path / "tmp").iterdir()) == []


WORKER = """
    import json, random, sys, torch, hashlib
    from blend.store import open_store
    root, me, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = open_store({"path": root, "memory_bytes": 1, "disk_bytes": 1 << 30}, "f" * 64)
    key = lambda t: hashlib.sha256(t.encode()).hexdigest()
    def val(tag):
        g = torch.Generator().manual_seed(int(key(tag)[:8], 16))
        return torch.randn(2, 2, 32, 2, 64, generator=g).to(torch.float16)
    import os, time, pathlib
    open(os.path.join(root, f"ready-{me}"), "w").close()  # start together
    while len(list(pathlib.Path(root).glob("ready-*"))) < 4:
        time.sleep(0.001)
    rnd = random.Random(me)
    bad, seen, others = 0, 0, 0
    for i in range(n):
        tags = [f"p{me}-{i}"] + ([f"shared-{i % 20}"] if i < 40 else [])  # all race on shared
        for t in tags:
            assert s.put(key(t), val(t))
        for _ in range(2):  # read something any process may have written
            t = f"p{rnd.randrange(4)}-{rnd.randrange(i + 1)}" if rnd.random() < .8 \\
                else f"shared-{rnd.randrange(20)}"
            got = s.get(key(t))
            if got is not None:
                seen += 1
                others += not t.startswith(f"p{me}-")
                bad += not torch.equal(got.view(torch.int16), val(t).view(torch.int16))
    print(json.dumps({"bad": bad, "seen": seen, "others": others, "errors": s.stats()["errors"]}))
"""


def test_four_processes_share_one_directory(tmp_path):
    n = 200
    procs = [_py(WORKER, str(tmp_path), str(me), str(n)) for me in range(4)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["bad"] == 0 and r["errors"] == {}, r  # no torn or wrong reads
        assert r["seen"] > n and r["others"] > n // 2  # they did read each other's entries
    s = _store(tmp_path)
    tags = [f"p{me}-{i}" for me in range(4) for i in range(n)] + [f"shared-{j}" for j in range(20)]
    assert all(s.lookup([key(t) for t in tags]))  # nothing lost
    for t in tags[::37] + tags[-20:]:
        assert s.get(key(t)) is not None
    assert s.stats()["errors"] == {}
    used = s.disk.usage()
    with s.disk._locked() as lk:  # the shared usage counter agrees with the directory
        assert s.disk._used(lk) == used
