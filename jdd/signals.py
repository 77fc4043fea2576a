"""SIGTERM and SIGINT (a scheduler's preemption notice, Ctrl-C): stop at a safe point, say what was kept.

The command line installs the handlers for the whole run (:func:`handled`, the one place that
does). Code that can stop cleanly, the distillation loop and a feature-cache build, runs inside
:func:`deferred`: there a signal is only recorded, and the code polls :func:`pending` at its safe
points (after a step: write the checkpoint of the current step; after a batch of the cache: its rows
are on disk), then raises :class:`Interrupted` with one line saying where it stopped. Anywhere else
(building the context, evaluating) nothing is half-written that a later run would read, so the
handler raises at once, with the line of the current :func:`stage`. A second signal always stops at
once. "At once" needs the main thread in Python: Python runs a handler only there, and a wait inside
the runtime for a compiled program (a full-protocol evaluation is one program of minutes) would hold
it until the program returns; so the probe's long programs run through :func:`call`, and such a
program ends at its next progress report (``jdd.progress.abandon``). The command line prints the
line and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports a
process killed by that signal.
"""
from __future__ import annotations

import contextlib
import functools
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_S = 0.05  # call(): how often the waiting main thread looks at the worker


class Interrupted(BaseException):
    """The run stopped on a signal; ``str()`` is the line for the user, ``status`` the exit status.

    A BaseException, like KeyboardInterrupt, so that handlers of ``Exception`` (e.g. a damaged
    checkpoint's fallback) never take it for an error of theirs."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def status(self) -> int:
        return 128 + int(self.signum)


_pending: int | None = None   # a signal received and not acted on yet
_deferring = 0                # > 0: inside a region that stops at its own safe points
_stage = "before the first step: nothing was lost; rerun the same command"


def name(signum: int) -> str:
    return signal.Signals(signum).name


def _handler(signum, frame) -> None:
    global _pending
    again = _pending is not None
    _pending = signum
    if again or not _deferring:
        # Stays pending until stop() or handled() clears it: Python drops an exception raised while
        # the handler runs inside a garbage-collection callback (jax registers one) or a __del__, and
        # check() then finds the signal at the next wait (measured: a raise lost in jax's callback).
        raise Interrupted(signum, f"interrupted by {name(signum)} {_stage}")


def pending() -> int | None:
    """The signal received and not acted on yet (None: none): inside :func:`deferred`, the one its
    code polls for; outside, one whose raise from the handler was lost (see :func:`check`)."""
    return _pending


def check() -> None:
    """Outside :func:`deferred`, raises :class:`Interrupted` for a pending signal: one whose handler
    ran where Python drops exceptions (a garbage-collection callback, a __del__). Called where the
    main thread waits (:func:`call`, host loops of long fits), so such a signal still stops there."""
    if _pending is not None and not _deferring:
        stop(_stage)


@contextlib.contextmanager
def handled():
    """Installs the SIGTERM / SIGINT handlers while the block runs (only from the main thread, the
    only one Python delivers signals to); the previous handlers come back afterwards."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending = None
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _pending = None


@contextlib.contextmanager
def deferred():
    """Inside the block a (first) signal is only recorded: the code polls :func:`pending`."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _pending is not None and not _deferring:  # the block ended without acting on it: stop now
        stop(_stage)


def deferring(fn):
    """``fn`` run inside :func:`deferred`."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with deferred():
            return fn(*args, **kwargs)
    return wrapped


@contextlib.contextmanager
def stage(text: str):
    """While the block runs, a signal stops the run at once with "interrupted by SIGNAL <text>"."""
    global _stage
    before, _stage = _stage, text
    try:
        yield
    finally:
        _stage = before


def stop(text: str) -> None:
    """Raises :class:`Interrupted` for the pending signal: "interrupted by SIGNAL <text>"."""
    global _pending
    signum, _pending = (_pending if _pending is not None else signal.SIGTERM), None
    raise Interrupted(signum, f"interrupted by {name(signum)} {text}")


def call(fn, abandon):
    """``jax.block_until_ready(fn())``, computed on a worker thread while the main thread waits in Python.

    Why: Python runs a signal's handler only on the main thread, between bytecodes, and a program that
    runs for minutes inside the runtime holds it until it returns (on CPU a program with host callbacks
    even runs inside the call that launches it). Waiting here, a handler that raises (ours, or the
    default SIGINT's KeyboardInterrupt) raises at once. Before that exception goes on, ``abandon()``
    must make the program end soon (``jdd.progress.abandon``: its next report raises), and the worker is
    joined: a process that exits while a program runs is aborted by the runtime. Off the main thread
    (signals never arrive there) ``fn`` runs on the calling thread.
    """
    import jax  # lazily: the rest of this module needs only the standard library
    if threading.current_thread() is not threading.main_thread():
        return jax.block_until_ready(fn())
    box, done = {}, threading.Event()

    def work():
        try:
            box["out"] = jax.block_until_ready(fn())
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            box["err"] = err
        finally:
            done.set()
    worker = threading.Thread(target=work, name="jdd-program", daemon=True)
    worker.start()
    try:
        while not done.wait(POLL_S):  # a handler that raises, raises here
            check()
    except BaseException:
        # Waits on `done`, not in Thread.join: an interrupted join can mark a running thread as ended
        # (CPython's bpo-45274 branch), and the process would then exit under a running program.
        abandon()
        done.wait()
        worker.join()
        raise
    worker.join()
    if "err" in box:
        raise box["err"]
    return box["out"]
