"""One `raymim prepare` per output folder: a second run exits 2 naming the lock; a crashed run's
stale lock (dead pid on this host, old heartbeat from another host, debris) is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from raymim.config import PrepareConfig
from raymim.data.lock import LOCK_NAME, STALE_AFTER_S, OutputLock, PrepareLocked, lock_holder

CFG = PrepareConfig(crop_size=[16, 16, 16], crops_per_volume=2)
CLI = "import sys; from raymim.cli import main; sys.exit(main(sys.argv[1:]))"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def _write_lock(out, **rec) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"started": "earlier", "process_start": 1.0, "token": "t0", **rec}))


@pytest.mark.slow
def test_second_prepare_exits_2_naming_the_lock(ray_session, phantoms, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out) as held:  # what a running prepare holds: this live process on this host
        env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, RAYMIM_DEID_KEY="k")
        second = subprocess.run([sys.executable, "-c", CLI, "prepare", "--input", str(phantoms), "--out", str(out),
                                 "--no-progress", "--set", "prepare.crop_size=[16,16,16]"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert str(held.path) in second.stderr and f"pid {os.getpid()}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert not (out / "shards").exists() and not (out / "manifest.json").exists()  # nothing written
        from raymim.data.pipeline import prepare

        with pytest.raises(PrepareLocked, match=LOCK_NAME):
            prepare(phantoms, out, CFG, progress=False)
    assert not held.path.exists()  # released
    summary = prepare(phantoms, out, CFG, progress=False)  # free again: this run takes it
    assert summary["exit_code"] == 0 and summary["ok"] == 6
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_prepare_takes_over_the_lock_of_a_dead_run(ray_session, phantoms, tmp_path, monkeypatch):
    from raymim.data.pipeline import prepare

    monkeypatch.setenv("RAYMIM_DEID_KEY", "k")
    out = tmp_path / "out"
    _write_lock(out, host=socket.gethostname(), pid=_dead_pid())  # a run killed with SIGKILL
    assert lock_holder(out / LOCK_NAME)["stale"]
    summary = prepare(phantoms, out, CFG, progress=False)
    assert summary["exit_code"] == 0 and summary["ok"] == 6
    assert not (out / LOCK_NAME).exists() and not list(out.glob(LOCK_NAME + ".*"))


def test_stale_rules_and_takeover(tmp_path):
    out = tmp_path / "out"
    lock = out / LOCK_NAME
    # another host, heartbeat fresh: held (its process cannot be checked from here)
    _write_lock(out, host="other-node", pid=4242)
    with pytest.raises(PrepareLocked, match="other-node"):
        OutputLock(out).acquire()
    # ... heartbeat older than STALE_AFTER_S: that run is dead, taken over
    old = time.time() - STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    taker = OutputLock(out).acquire()
    assert taker.took_over["host"] == "other-node" and json.loads(lock.read_text())["token"] == taker.token
    taker.release()
    # this host, a live pid that started at another time: the pid was reused, the run is dead
    _write_lock(out, host=socket.gethostname(), pid=os.getpid(), process_start=12.0)
    assert lock_holder(lock)["stale"]
    # ... the same pid with its real start time: alive
    me = OutputLock(out)
    lock.unlink()
    me.acquire()
    with pytest.raises(PrepareLocked):
        OutputLock(out).acquire()
    me.release()
    # unreadable content (not a lock any version writes): held while fresh, debris once old
    lock.write_bytes(b"\x00garbage")
    with pytest.raises(PrepareLocked):
        OutputLock(out).acquire()
    os.utime(lock, (old, old))
    OutputLock(out).acquire().release()
    assert not lock.exists()


def test_only_one_of_many_takers_wins_a_stale_lock(tmp_path):
    out = tmp_path / "out"
    _write_lock(out, host=socket.gethostname(), pid=_dead_pid())
    won, lost = [], []
    start = threading.Barrier(8)

    def take() -> None:
        start.wait()
        try:
            won.append(OutputLock(out).acquire())
        except PrepareLocked:
            lost.append(1)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # All takers share this live pid, so a lock taken by one is held for the others.
    assert len(won) == 1 and len(lost) == 7
    assert json.loads((out / LOCK_NAME).read_text())["token"] == won[0].token
    won[0].release()
