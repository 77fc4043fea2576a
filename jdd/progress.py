"""Progress with an ETA for long stages, including from inside one compiled program.

A compiled program cannot hold a Python object, and one compilation serves many calls, so the program
takes a run id (a traced int) and calls `report(run_id, done, after)` with `jax.debug.callback`; the
host finds the `Progress` registered under that id (`reporter`). `after` is any value of the finished
work: depending on it makes the call wait for that work, and reading a value changes no result.

    with reporter(Progress(total, "log", "probe (full)", epochs=1000)) as run_id:
        out = jax.block_until_ready(compiled(..., run_id))

Host loops use a `Progress` directly: `p.update(done)` after each item.

A report is also where a program that nobody waits for any more ends: after `abandon(run_id)` (the
waiter was stopped by a signal: `jdd.signals.call`), the program's next report raises `Abandoned`,
which fails the program instead of letting it run on unobserved (minutes for a full-protocol
evaluation, holding the CPU or accelerator, and a process must not exit while a program runs).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time

MODES = ("", "bar", "log")  # silent, a tqdm bar on stderr, or INFO lines on the "jdd" logger
LOG_EVERY_S = 30.0          # "log": at most one line per this many seconds, plus the first and the last

log = logging.getLogger("jdd")


class Progress:
    """Fraction done, elapsed time and ETA of `total` units of work, shown as a bar or as log lines.

    epochs: when given, a unit count is shown as the matching epoch (units need not be epochs: a probe
    reports per micro-batch of views). The ETA uses the rate since the first report, so a compilation
    before it does not inflate the estimate.
    """

    def __init__(self, total: int, mode: str, desc: str, *, epochs: int | None = None, unit: str = "epoch"):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is unknown; use one of {MODES} ('' = silent)")
        self.total, self.mode, self.desc = max(int(total), 1), mode, desc
        self.epochs, self.unit = epochs, unit
        self.t0 = time.perf_counter()
        self.first = None            # (done, time) of the first report
        self.done, self.last_log = 0, -math.inf
        self.lock = threading.Lock()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=epochs or self.total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def eta(self, done: int, now: float) -> float:
        """Seconds left, at the rate since the first report (or since the start before a second one)."""
        if self.first is None or done <= self.first[0]:
            return (now - self.t0) / done * (self.total - done)
        d0, t0 = self.first
        return (now - t0) / (done - d0) * (self.total - done)

    def update(self, done: int) -> None:
        with self.lock:              # reports may come from the runtime's threads
            if self.mode == "" or done <= self.done:  # unordered callbacks: keep the furthest point
                return
            now = time.perf_counter()
            eta = self.eta(done, now)
            self.first = self.first or (done, now)
            self.done = done
            shown = round(self.epochs * done / self.total) if self.epochs else done
            if self.bar is not None:
                self.bar.update(shown - self.bar.n)
                self.bar.set_postfix_str(f"ETA {eta:.0f} s", refresh=done == self.total)
            elif done == self.total or done == self.first[0] or now - self.last_log >= LOG_EVERY_S:
                self.last_log = now
                of = f"{self.unit} {'~' if self.epochs else ''}{shown} of {self.epochs or self.total}"
                log.info("%s: %3.0f%% (%s), %.0f s elapsed, ETA %.0f s", self.desc, 100.0 * done / self.total,
                         of, now - self.t0, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Abandoned(RuntimeError):
    """Raised by a report of an abandoned run: it ends that run's program."""


class _NotAbandoned(logging.Filter):
    """jax logs every failed debug callback with its traceback; an abandoned run's is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], Abandoned))


logging.getLogger("jax._src.debugging").addFilter(_NotAbandoned())

_REPORTERS: dict[int, Progress] = {}
_ABANDONED: set[int] = set()
_RUN_IDS = itertools.count(1)


@contextlib.contextmanager
def reporter(progress: Progress):
    """Registers `progress` for the duration; yields its run id (pass it to the compiled program)."""
    run_id = next(_RUN_IDS)
    _REPORTERS[run_id] = progress
    try:
        yield run_id
    finally:
        _REPORTERS.pop(run_id)
        _ABANDONED.discard(run_id)  # its program has ended: the caller waited for it (signals.call)
        progress.close()


def abandon(run_id: int) -> None:
    """From now on a report of run `run_id` raises `Abandoned`, which ends its program."""
    _ABANDONED.add(int(run_id))


def report(run_id, done, after=None) -> None:
    """The host callback: `done` units of run `run_id` are finished (`after`: see module doc)."""
    run_id = int(run_id)
    if run_id in _ABANDONED:
        raise Abandoned(f"run {run_id}: its waiter has gone; ending the program")
    rep = _REPORTERS.get(run_id)
    if rep is not None:
        rep.update(int(done))
