"""The run directory: one owner at a time, clear errors for unusable paths, files written atomically.

    path = prepare_workdir(flags.workdir)     # one-sentence error if it cannot hold a run
    with lock(path):                          # a second live run on it fails, naming pid and host
        truncate_metrics(path, resumed_step)  # metrics.jsonl holds each step once across resumes
        atomic_write_json(os.path.join(path, "best.json"), {"step": 550, "top1": 54.1})

A run's files are replaced atomically (a temporary file in the same directory, fsync, ``os.replace``),
so a kill at any moment leaves the old file or the new one, never an empty or half-written one;
:func:`read_json_or_none` still treats an empty or corrupt JSON file (from older versions, or a
copy gone wrong) as absent, with a warning, instead of failing a resume.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
from typing import Any, Iterator

log = logging.getLogger("jdd")

LOCK_NAME = ".jdd.lock"
METRICS_NAME = "metrics.jsonl"
# Below this much free space a run is likely to die mid-checkpoint; said up front, not refused.
LOW_SPACE_BYTES = 200 * 2**20
# flock errors meaning "this file system does not do flock": fall back to the pid in the file.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirError(OSError):
    """A workdir that cannot hold a run (a file, not writable, or in use); the message says what to do."""


class WorkdirLocked(WorkdirError):
    """Another live process holds the workdir's lock."""


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------
def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_writable(directory: str, what: str) -> None:
    """Raises WorkdirError unless a file can be created in ``directory`` (os.access and a probe file:
    access() alone misses read-only mounts for root, and ACLs)."""
    reason = None
    if not os.access(directory, os.W_OK | os.X_OK):
        reason = "no write permission"
    else:
        try:
            fd, probe = tempfile.mkstemp(dir=directory, prefix=".jdd-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            reason = err.strerror or str(err)
    if reason:
        raise WorkdirError(f"{what} is not writable ({reason}); pass a --workdir in a directory you can "
                           f"write to")


def prepare_workdir(path: str) -> str:
    """The absolute workdir path, after checking that a run can write there; creates nothing.

    Errors (one sentence each): the path is a file; a component above it is a file; it (or, when it
    does not exist yet, its nearest existing parent) is not writable. Missing parents are fine: the
    run creates them, as ``--workdir=runs/x`` in a fresh checkout needs. Warns when the file system
    has less than LOW_SPACE_BYTES free.
    """
    if not path:
        raise WorkdirError("--workdir is empty; pass the directory for the run's checkpoints and results")
    p = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.exists(p) and not os.path.isdir(p):
        raise WorkdirError(f"--workdir {p} is a file, not a directory; pass a directory path (it is created "
                           f"when missing)")
    anchor = _nearest_existing(p)
    if not os.path.isdir(anchor):
        raise WorkdirError(f"cannot create --workdir {p}: {anchor} is a file, not a directory; pass another "
                           f"path")
    _check_writable(p if anchor == p else anchor, f"--workdir {p}" if anchor == p else
                    f"{anchor} (where --workdir {p} would be created)")
    try:
        st = os.statvfs(anchor)
        free = st.f_bavail * st.f_frsize
        if free < LOW_SPACE_BYTES:
            log.warning("only %.0f MiB free where --workdir %s lives; checkpoints may not fit", free / 2**20, p)
    except OSError:
        pass
    return p


# ------------------------------------------------------------------------------------------------
# Lock
# ------------------------------------------------------------------------------------------------
_HELD: dict[str, "WorkdirLock"] = {}  # real path -> the lock this process holds on it


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_owner(path: str) -> dict | None:
    try:
        with open(path) as f:
            text = f.read()
        owner = json.loads(text) if text.strip() else None
        return owner if isinstance(owner, dict) else None
    except (OSError, ValueError):
        return None


def _describe(owner: dict | None) -> str:
    if not owner:
        return "an unknown process"
    return f"pid {owner.get('pid')} on host {owner.get('host')} (started {owner.get('started', '?')})"


class WorkdirLock:
    """``<workdir>/.jdd.lock``: an flock held for the run's lifetime, the file naming its owner.

    The kernel drops an flock when its process dies, however it dies, so a lock file left behind by
    a killed run (same host, pid dead) is taken over, with a warning. A file naming another host is
    refused: flock may not reach across machines, so a live run there cannot be ruled out. Nested
    acquisitions by one process share the lock. In a multi-process run only process 0 should lock.
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(os.path.expanduser(str(workdir)))
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self._fd: int | None = None
        self._depth = 0
        self._created: list[str] = []

    # -- acquire / release ------------------------------------------------------------------
    def acquire(self) -> "WorkdirLock":
        key = os.path.realpath(self.workdir)
        held = _HELD.get(key)
        if held is not None:
            held._depth += 1
            return held
        self._created = _makedirs(self.workdir)
        try:
            self._fd = self._lock_file()
        except BaseException:
            _remove_empty(self._created)
            raise
        self._depth = 1
        _HELD[os.path.realpath(self.workdir)] = self
        return self

    def _lock_file(self) -> int:
        for _ in range(10):  # retried only when another process replaced the file meanwhile
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                state = _flock(fd)
                if state == "busy":
                    raise WorkdirLocked(self._in_use(_read_owner(self.path), "wait for it or stop it, or use "
                                                     "another --workdir"))
                if state == "locked" and not _same_file(fd, self.path):
                    os.close(fd)  # we locked a file its owner unlinked on release: lock the new one
                    continue
                self._check_previous(_read_owner(self.path), flocked=state == "locked")
                _write_owner(fd)
                return fd
            except BaseException:
                os.close(fd)
                raise
        raise WorkdirError(f"could not lock {self.path}: it keeps changing; is another run starting there?")

    def _check_previous(self, owner: dict | None, flocked: bool) -> None:
        """Raises when ``owner`` (the file's contents) may still be running; warns on a stale lock."""
        if owner is None:
            return
        host, pid = owner.get("host"), owner.get("pid")
        mine = host == socket.gethostname()
        if mine and pid == os.getpid():
            return
        if not mine or (not flocked and isinstance(pid, int) and _pid_alive(pid)):
            raise WorkdirLocked(self._in_use(owner, f"wait for it or stop it, use another --workdir, or, if "
                                                    f"no run is active there, delete {self.path}"))
        log.warning("taking over the stale lock %s of %s, which is no longer running", self.path, _describe(owner))

    def _in_use(self, owner: dict | None, advice: str) -> str:
        return f"--workdir {self.workdir} is in use by another jdd run ({_describe(owner)}); {advice}"

    def release(self) -> None:
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        _HELD.pop(os.path.realpath(self.workdir), None)
        try:
            os.unlink(self.path)  # while still holding the flock, so no one takes a half-released lock
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        _remove_empty(self._created)
        self._created = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock(workdir: str) -> WorkdirLock:
    """Acquires ``<workdir>/.jdd.lock`` (creating the workdir) and returns it; release it, or use
    ``with lock(workdir):``. Raises WorkdirLocked naming the live owner's pid and host. Directories
    it created are removed again on release when still empty, so a run that fails early leaves no trace.
    """
    return WorkdirLock(workdir).acquire()


def _flock(fd: int) -> str:
    """Tries the exclusive flock of ``fd``: "locked", "busy" (another open file holds it) or
    "unsupported" (this file system has no flock: the pid in the file decides instead)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "locked"
    except BlockingIOError:
        return "busy"
    except OSError as err:
        if err.errno in _NO_FLOCK:
            return "unsupported"
        raise


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _write_owner(fd: int) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    data = json.dumps(owner).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _makedirs(path: str) -> list[str]:
    """Creates ``path`` and its missing parents; returns the directories created, outermost first."""
    missing = []
    p = path
    while not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p)
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d)
    return list(reversed(missing))


def _remove_empty(created: list[str]) -> None:
    for d in reversed(created):  # innermost first
        try:
            os.rmdir(d)
        except OSError:
            return  # not empty (the run wrote there) or gone: leave it and its parents


# ------------------------------------------------------------------------------------------------
# Atomic files
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[Any]:
    """A file object whose contents replace ``path`` atomically on a clean exit (never on an error).

    For writers that want a file object, e.g. ``np.savez(f, ...)``. The temporary file lives next to
    ``path`` (``os.replace`` is atomic only within one file system) and is fsynced before the rename.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Makes a rename durable (the directory entry), where the OS allows opening a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str, obj: Any, **dump_kw) -> None:
    """``json.dumps(obj)`` into ``path``, atomically (readers see the old file or the new one)."""
    dump_kw.setdefault("indent", 1)
    atomic_write_text(path, json.dumps(obj, **dump_kw) + "\n")


def read_json_or_none(path: str) -> Any | None:
    """The JSON in ``path``; None when it is absent, or empty / not valid JSON (with a warning)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError as err:
        log.warning("%s is %s; treating it as absent", path,
                    "empty" if not text.strip() else f"not valid JSON ({err})")
        return None


# ------------------------------------------------------------------------------------------------
# Metrics across resumes
# ------------------------------------------------------------------------------------------------
def read_metrics(workdir: str, name: str = METRICS_NAME) -> list[dict]:
    """The rows of ``<workdir>/metrics.jsonl`` in file order ([] without the file); a row cut off by a
    kill (not valid JSON) is skipped."""
    try:
        with open(os.path.join(workdir, name)) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in filter(str.strip, lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def truncate_metrics(workdir: str, step: int, name: str = METRICS_NAME) -> int:
    """Drops the rows of ``<workdir>/metrics.jsonl`` with ``step`` > ``step``; returns how many.

    Call it when resuming from the checkpoint of ``step``: rows after it were written by the run that
    died and are written again by the resumed one, so each step appears once. A row cut off by the
    kill (not valid JSON) is dropped too. Rewritten atomically; no file, nothing to do.
    """
    path = os.path.join(workdir, name)
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return 0
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    dropped = sum(1 for ln in lines if ln.strip()) - len(kept)
    if dropped:
        atomic_write_text(path, "".join(kept))
        log.info("dropped %d metrics row(s) after step %d from %s (they are logged again)", dropped, step, path)
    return dropped
