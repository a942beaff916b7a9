"""build_once: one build however many processes ask, a dead holder replaced, nothing half-built ever trusted."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from vlft.data import once
from vlft.data.once import build_once

CTX = multiprocessing.get_context("spawn")  # no fork of a pytest process that may hold other tests' threads
HOST = socket.gethostname()


def _counting_build(counter: Path, sleep_s: float = 0.0, fail: bool = False):
    """A build that appends its pid to `counter` (one line per build started), sleeps, and writes two files."""

    def build(tmp: Path) -> None:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        (tmp / "part1").write_text("1")
        time.sleep(sleep_s)
        if fail:
            raise RuntimeError("build failed")
        (tmp / "part2").write_text("2")

    return build


def _race(final: str, counter: str, start, results, times: dict) -> None:
    start.wait()
    built = build_once(Path(final), _counting_build(Path(counter), sleep_s=1.0), what="test data", poll_s=0.02,
                       **times)
    done = Path(final)
    results.put((built, sorted(p.name for p in done.iterdir()) if done.is_dir() else None))


def _build_forever(final: str, counter: str) -> None:
    build_once(Path(final), _counting_build(Path(counter), sleep_s=600), what="test data")


def _build_and_fail(final: str, counter: str) -> None:
    try:
        build_once(Path(final), _counting_build(Path(counter), sleep_s=0.5, fail=True), what="test data")
    except RuntimeError:
        pass


def _lines(counter: Path) -> list[str]:
    return counter.read_text().split() if counter.exists() else []


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith((".tmp", ".lock", ".break")))


def _dead_pid() -> int:
    proc = CTX.Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()
    return proc.pid


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# (4, False, short): the build (1 s) outlasts stale_s, so only the holder's heartbeat keeps the waiters waiting
@pytest.mark.parametrize("n, stale_lock, times", [(2, False, {}), (4, False, {"stale_s": 0.5, "heartbeat_s": 0.1}),
                                                  (4, True, {})], ids=["2", "4-short-stale_s", "4-dead-holder"])
def test_processes_started_together_build_once(tmp_path, n, stale_lock, times):
    final, counter = tmp_path / "prepared", tmp_path / "counter"
    if stale_lock:  # every process finds a dead holder's lock at once: exactly one of them may break it
        lock = tmp_path / "prepared.lock"
        lock.write_text(json.dumps({"host": HOST, "pid": _dead_pid(), "started": time.time()}))
    start, results = CTX.Event(), CTX.Queue()
    procs = [CTX.Process(target=_race, args=(str(final), str(counter), start, results, times)) for _ in range(n)]
    for proc in procs:
        proc.start()
    start.set()
    outcome = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert len(_lines(counter)) == 1
    assert sorted(built for built, _ in outcome) == [False] * (n - 1) + [True]
    assert all(files == ["part1", "part2"] for _, files in outcome)  # every process returned after `final` was whole
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failing_build_leaves_nothing_and_the_next_call_builds(tmp_path, error):
    final = tmp_path / "prepared"

    def build(tmp):
        (tmp / "part1").write_text("1")
        raise error("stop")

    with pytest.raises(error):
        build_once(final, build, what="test data")
    assert not final.exists()
    assert _leftovers(tmp_path) == []
    assert build_once(final, lambda tmp: (tmp / "ok").write_text("1"), what="test data") is True
    assert [p.name for p in final.iterdir()] == ["ok"]
    assert build_once(final, build, what="test data") is False  # exists: not built again
    assert _leftovers(tmp_path) == []


def test_a_waiter_builds_when_the_holder_fails(tmp_path):
    final, counter, lock = tmp_path / "prepared", tmp_path / "counter", tmp_path / "prepared.lock"
    holder = CTX.Process(target=_build_and_fail, args=(str(final), str(counter)))
    holder.start()
    _wait_for(lambda: len(_lines(counter)) == 1)
    assert lock.exists()
    assert build_once(final, _counting_build(counter), what="test data", poll_s=0.02) is True
    holder.join(timeout=30)
    assert _lines(counter) == [str(holder.pid), str(os.getpid())]
    assert sorted(p.name for p in final.iterdir()) == ["part1", "part2"]
    assert _leftovers(tmp_path) == []


def test_a_killed_builder_is_replaced_and_its_tmp_removed(tmp_path, capsys):
    final, counter, lock = tmp_path / "prepared", tmp_path / "counter", tmp_path / "prepared.lock"
    holder = CTX.Process(target=_build_forever, args=(str(final), str(counter)))
    holder.start()
    _wait_for(lambda: len(_lines(counter)) == 1)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(timeout=30)
    dead_tmp = tmp_path / f".prepared.{HOST}.{holder.pid}.tmp"
    assert not final.exists()
    assert _leftovers(tmp_path) == sorted([dead_tmp.name, lock.name])  # never trusted: left for the next caller
    assert [p.name for p in dead_tmp.iterdir()] == ["part1"]

    t0 = time.monotonic()
    assert build_once(final, _counting_build(counter), what="test data", stale_s=20) is True
    assert time.monotonic() - t0 < 10  # the dead pid decides, not the lock's age
    err = capsys.readouterr().err
    assert f"test data: {HOST} pid {holder.pid}, which was preparing it, is no longer running" in err
    assert f"{HOST} pid {os.getpid()} prepares it instead ({lock})" in err
    assert _lines(counter) == [str(holder.pid), str(os.getpid())]
    assert sorted(p.name for p in final.iterdir()) == ["part1", "part2"]
    assert _leftovers(tmp_path) == []


def _other_host_lock(lock: Path, started: float) -> Path:
    """A lock of pid 1 on another host, with that holder's tmp dir; returns the tmp dir."""
    lock.write_text(json.dumps({"host": "other-node", "pid": 1, "started": started}))
    tmp = lock.parent / ".prepared.other-node.1.tmp"
    tmp.mkdir()
    (tmp / "part1").write_text("1")
    return tmp


def test_a_live_holder_on_another_host_is_waited_for(tmp_path, capsys):
    final, counter, lock = tmp_path / "prepared", tmp_path / "counter", tmp_path / "prepared.lock"
    other_tmp = _other_host_lock(lock, started=time.time() - 100)
    stop = threading.Event()

    def other_node():  # heartbeat for 1.5 s (three times stale_s), then finish as a holder does
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            os.utime(lock)
            stop.wait(0.05)
        (other_tmp / "part2").write_text("2")
        os.rename(other_tmp, final)
        lock.unlink()

    thread = threading.Thread(target=other_node)
    thread.start()
    t0 = time.monotonic()
    try:
        built = build_once(final, _counting_build(counter), what="test data", poll_s=0.02, stale_s=0.5,
                           heartbeat_s=0.05, wait_log_s=0.3)
    finally:
        stop.set()
        thread.join()
    assert built is False
    assert time.monotonic() - t0 >= 1.5
    assert _lines(counter) == []
    assert sorted(p.name for p in final.iterdir()) == ["part1", "part2"]
    err = capsys.readouterr().err
    waits = [line for line in err.splitlines() if line.startswith("[vlft] waiting for test data: ")]
    assert len(waits) >= 2
    assert all(line.endswith(f"({lock})") and "being prepared by other-node pid 1 for 1" in line for line in waits)
    assert "instead" not in err


def test_a_holder_on_another_host_without_heartbeat_is_taken_over(tmp_path, capsys):
    final, counter, lock = tmp_path / "prepared", tmp_path / "counter", tmp_path / "prepared.lock"
    other_tmp = _other_host_lock(lock, started=time.time() - 30)
    os.utime(lock, (time.time() - 10, time.time() - 10))
    assert build_once(final, _counting_build(counter), what="test data", stale_s=5.0) is True
    err = capsys.readouterr().err
    assert "test data: other-node pid 1, which was preparing it, has not refreshed its lock for 10 s" in err
    assert _lines(counter) == [str(os.getpid())]
    assert not other_tmp.exists()
    assert _leftovers(tmp_path) == []


def test_an_unwritten_lock_is_stale_after_a_few_heartbeats(tmp_path, capsys):
    final, counter, lock = tmp_path / "prepared", tmp_path / "counter", tmp_path / "prepared.lock"
    lock.touch()  # its holder died between creating and writing it
    t0 = time.monotonic()
    assert build_once(final, _counting_build(counter), what="test data", poll_s=0.02, heartbeat_s=0.2) is True
    assert time.monotonic() - t0 >= 0.6  # three heartbeat periods
    assert "a process that never wrote its lock, which was preparing it, left its lock unwritten" in \
        capsys.readouterr().err
    assert _lines(counter) == [str(os.getpid())]
    assert _leftovers(tmp_path) == []


def test_a_holder_whose_lock_was_taken_over_leaves_the_new_lock(tmp_path):
    final, lock = tmp_path / "prepared", tmp_path / "prepared.lock"
    successor = {"host": "other-node", "pid": 1, "started": time.time()}

    def build(tmp):  # meanwhile judged dead, its lock broken and taken by another process
        lock.unlink()
        lock.write_text(json.dumps(successor))

    assert build_once(final, build, what="test data") is True
    assert json.loads(lock.read_text()) == successor


def _finish_as_other_node(final: Path, lock: Path, after_s: float) -> threading.Thread:
    """Another host's holder that renames its result into place and releases its lock after `after_s`."""

    def finish():
        time.sleep(after_s)
        tmp = final.parent / ".prepared.other-node.1.tmp"
        tmp.mkdir(exist_ok=True)
        os.rename(tmp, final)
        lock.unlink()

    thread = threading.Thread(target=finish)
    thread.start()
    return thread


def test_a_lock_taken_afresh_after_being_judged_stale_is_not_broken(tmp_path, monkeypatch):
    # The interleaving of two waiters and a dead holder: this waiter judged the dead holder's lock stale, then
    # another waiter broke it and took the lock afresh; what this waiter now breaks must be judged again.
    final, counter, lock = tmp_path / "prepared", tmp_path / "counter", tmp_path / "prepared.lock"
    lock.write_text(json.dumps({"host": "other-node", "pid": 1, "started": time.time()}))
    judged = []

    def stale_once(*args):
        judged.append(args)
        return "is no longer running" if len(judged) == 1 else real(*args)

    real = once._stale_reason
    monkeypatch.setattr(once, "_stale_reason", stale_once)
    thread = _finish_as_other_node(final, lock, after_s=0.5)
    try:
        assert build_once(final, _counting_build(counter), what="test data", poll_s=0.02) is False
    finally:
        thread.join()
    assert _lines(counter) == []
    assert len(judged) >= 2


def test_a_result_that_appears_while_the_lock_is_taken_is_not_rebuilt(tmp_path, monkeypatch):
    # The holder renamed `final` into place and released its lock between this process's look and its create.
    final, counter = tmp_path / "prepared", tmp_path / "counter"
    real = once._take

    def take_after_the_holder_finished(*args):
        if not final.exists():
            final.mkdir()
        return real(*args)

    monkeypatch.setattr(once, "_take", take_after_the_holder_finished)
    assert build_once(final, _counting_build(counter), what="test data") is False
    assert _lines(counter) == []
    assert _leftovers(tmp_path) == []
