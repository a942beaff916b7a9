"""Build a directory once, however many processes ask for it: coordination through the file system only.

torchrun and the DeepSpeed launcher start one process per GPU, and every one of them calls data preparation. With
`build_once`, the first process to create `<final>.lock` (os.open with O_CREAT | O_EXCL, atomic on a local file
system and on NFSv3+ / Lustre / GPFS) builds into a private tmp directory and renames it to `final`; the others
poll until `final` exists. No torch.distributed collective is involved: a rank waiting in a collective for a long
preparation hits the NCCL timeout, a rank polling a file does not.

- `final` on a file system every node sees: built once per job. On a node-local cache directory: once per node.
- `final` only ever appears by an atomic rename, so a `final` that exists is complete. A builder that is killed
  leaves only its tmp directory and its lock, and neither is ever read as a result.
- A dead holder is recognised and replaced: on the same host its pid is gone (os.kill(pid, 0)); on any host its
  lock's mtime, refreshed every `heartbeat_s` by a thread of the holder, is older than `stale_s`. Stale locks are
  broken under a second lock (`<final>.lock.break`, O_EXCL too), so that of several waiters that judge a lock stale
  exactly one removes it, and a fresh lock taken meanwhile by another waiter is never removed.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vlft.utils import log

# An unreadable lock (its holder died between creating it and writing it) is stale once older than this many
# heartbeat periods; the same age makes a `.break` file stale (its holder died while breaking a stale lock).
_UNREADABLE_HEARTBEATS = 3


def build_once(final: Path, build: Callable[[Path], None], *, what: str, poll_s: float = 0.2,
               stale_s: float = 120.0, heartbeat_s: float = 5.0, wait_log_s: float = 30.0,
               first_log_s: float = 3.0) -> bool:
    """Make sure the directory `final` exists, calling `build` in exactly one of the processes that ask at once.

    `build(tmp)` fills the empty directory `tmp` (`final.parent / f".{final.name}.{host}.{pid}.tmp"`), which is then
    renamed to `final`. `what` names the result in log lines ("waiting for <what>: ..."). Times are seconds:
    `poll_s` between looks at the lock, `heartbeat_s` between the holder's refreshes of the lock's mtime, `stale_s`
    after which a lock not refreshed belongs to a dead holder (keep it well above `heartbeat_s`: a loaded shared
    file system may delay a refresh), `wait_log_s` between "waiting" lines (vlft.utils.log: rank 0 only), the first
    after `first_log_s` (a wait that short says nothing; a long one says so at once, so it never looks like a hang).

    Returns True when this process built `final`, False when it already existed or another process built it.
    Whatever `build` raises (KeyboardInterrupt included) is re-raised after its tmp directory and the lock are
    removed, and a waiting process then takes the lock and builds itself. OSError from the file system (e.g. a
    read-only `final.parent`) propagates.
    """
    final = Path(final)
    lock = final.parent / (final.name + ".lock")
    final.parent.mkdir(parents=True, exist_ok=True)
    host, pid = socket.gethostname(), os.getpid()
    next_log = time.monotonic() + min(first_log_s, wait_log_s)
    while True:
        if final.exists():
            return False
        mine = _take(lock, host, pid)
        if mine is not None:
            return _build_holding(final, lock, mine, build, heartbeat_s)
        try:
            stat = os.stat(lock)
        except FileNotFoundError:  # released between our create and our look: try again at once
            continue
        holder = _read_holder(lock)
        if _stale_reason(holder, stat, stale_s, heartbeat_s, host) is not None:
            _break_stale(final, lock, what, stale_s, heartbeat_s, poll_s, host, pid)
            continue
        if time.monotonic() >= next_log:
            log(f"waiting for {what}: being prepared by {_describe(holder, stat)} ({lock})")
            next_log = time.monotonic() + min(first_log_s, wait_log_s)
        time.sleep(poll_s)


def _take(lock: Path, host: str, pid: int) -> dict | None:
    """Create the lock if nobody holds it (O_EXCL), holding who holds it and since when (returned); None when it
    exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    mine = {"host": host, "pid": pid, "started": time.time()}
    try:
        os.write(fd, json.dumps(mine).encode())
    except BaseException:
        os.close(fd)
        _unlink(lock)
        raise
    os.close(fd)
    return mine


def _build_holding(final: Path, lock: Path, mine: dict, build: Callable[[Path], None], heartbeat_s: float) -> bool:
    """Build into tmp and rename it to `final`, holding `lock` (taken by this process: `mine` is its content) and
    refreshing it."""
    stop = threading.Event()
    heartbeat = threading.Thread(target=_heartbeat, args=(lock, stop, heartbeat_s), daemon=True,
                                 name=f"vlft-lock-heartbeat:{final.name}")
    tmp = _tmp_dir(final, mine["host"], mine["pid"])
    try:
        # A holder may have renamed `final` into place and released the lock between our look and our create.
        if final.exists():
            return False
        heartbeat.start()
        shutil.rmtree(tmp, ignore_errors=True)  # only ours: the name carries this host and pid
        tmp.mkdir()
        build(tmp)
        try:
            if final.exists():
                raise FileExistsError(final)
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # built twice (a holder judged dead was not): keep the first
        return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        stop.set()
        if heartbeat.is_alive():
            heartbeat.join()
        if _read_holder(lock) == mine:  # still ours (not broken as stale and taken by another process meanwhile)
            _unlink(lock)


def _heartbeat(lock: Path, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            os.utime(lock)
        except OSError:  # gone (broken as stale) or the file system hiccuped: the next beat tries again
            pass


def _tmp_dir(final: Path, host: str, pid: int) -> Path:
    return final.parent / f".{final.name}.{host}.{pid}.tmp"


def _read_holder(lock: Path) -> dict | None:
    """The lock's {"host", "pid", "started"}; None when it is missing, empty, half-written or not ours."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(holder, dict) and isinstance(holder.get("host"), str) and isinstance(holder.get("pid"), int)
            and isinstance(holder.get("started"), (int, float))):
        return None
    return holder


def _stale_reason(holder: dict | None, stat: os.stat_result, stale_s: float, heartbeat_s: float,
                  host: str) -> str | None:
    """Why the lock's holder is dead, or None while it may be alive."""
    age = time.time() - stat.st_mtime
    if holder is None:
        limit = _UNREADABLE_HEARTBEATS * heartbeat_s
        return f"left its lock unwritten for {age:.0f} s" if age > limit else None
    if holder["host"] == host and not _pid_alive(holder["pid"]):
        return "is no longer running"
    if age > stale_s:
        return f"has not refreshed its lock for {age:.0f} s (more than {stale_s:g} s)"
    return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _break_stale(final: Path, lock: Path, what: str, stale_s: float, heartbeat_s: float, poll_s: float, host: str,
                 pid: int) -> None:
    """Remove a stale lock and its holder's tmp directory, in at most one of the processes that judged it stale.

    Under `<lock>.break` (O_EXCL) the lock is looked at again and removed only if still stale: a waiter that took
    the lock after another broke it holds a fresh one, which a late breaker must not remove (a plain rename-away
    of the path could take that fresh lock instead of the stale one it looked at)."""
    breaker = lock.with_name(lock.name + ".break")
    try:
        os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:  # its creator died while breaking: remove it, and the next look breaks the lock
            if time.time() - os.stat(breaker).st_mtime > _UNREADABLE_HEARTBEATS * heartbeat_s:
                _unlink(breaker)
        except FileNotFoundError:
            pass
        time.sleep(poll_s)
        return
    try:
        try:
            stat = os.stat(lock)
        except FileNotFoundError:
            return
        holder = _read_holder(lock)
        reason = _stale_reason(holder, stat, stale_s, heartbeat_s, host)
        if reason is None:
            return
        _unlink(lock)
        if holder is not None:
            shutil.rmtree(_tmp_dir(final, holder["host"], holder["pid"]), ignore_errors=True)
    finally:
        _unlink(breaker)
    # One line from whichever rank breaks the lock (vlft.utils.log would drop it on every rank but 0); exactly one
    # process gets here per dead holder, so it is still one line per job.
    print(f"[vlft] {what}: {_who(holder)}, which was preparing it, {reason}; {host} pid {pid} prepares it "
          f"instead ({lock})", file=sys.stderr, flush=True)


def _describe(holder: dict | None, stat: os.stat_result) -> str:
    """'<host> pid <pid> for <N> s' (N from the holder's start), or what is known of a lock not yet written."""
    if holder is None:
        return f"a process that has not yet written its lock (created {time.time() - stat.st_mtime:.0f} s ago)"
    return f"{_who(holder)} for {max(0.0, time.time() - holder['started']):.0f} s"


def _who(holder: dict | None) -> str:
    return "a process that never wrote its lock" if holder is None else f"{holder['host']} pid {holder['pid']}"


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
