"""Command line: ``python -m jdd.main --config=configs/NAME.py[:ARGS] --workdir=DIR [--mode=...]``.

Only parses flags and calls :func:`jdd.distill.run`, which tests call directly too. Config values
can be overridden with ``--config.a.b=value``; the config is locked, so an unknown key is an error.

Before the run starts, every config value is validated (:mod:`jdd.validation`), the workdir is
checked and locked (:mod:`jdd.workdir`). Errors a user can act on (a bad value, a missing file, a
full disk, ...) print as one line, ``jdd: error: ...``, with exit status 2; anything else is a bug
and prints one line with exit status 1. ``--verbose`` or ``JDD_DEBUG=1`` shows the full traceback.
"""
from __future__ import annotations

import difflib
import errno
import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:args])",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, logs, distilled set, results")
flags.DEFINE_enum("mode", "distill", ["distill", "eval", "baselines", "export"],
                  "distill (then evaluate), eval (the workdir's distilled set, or --eval_set), baselines, "
                  "or export (write the workdir's distilled set as PNG ImageFolder and LGM .pth)")
flags.DEFINE_string("eval_npz", None, "with --mode=eval: evaluate this distilled.npz instead")
flags.DEFINE_string("eval_set", None, "with --mode=eval: evaluate this set instead: a jdd .npz, an LGM-format "
                    ".pth/.pt, or an ImageFolder directory (<class>/<image>.png); with --mode=export: export it")
flags.DEFINE_bool("verbose", False, "print the full traceback of an error (also: JDD_DEBUG=1)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

USAGE_STATUS = 2   # bad input: a value, a path, a file; the message says what to change
BUG_STATUS = 1     # anything else
# Errors whose message is written for the user (validation, data, backbone, workdir, checkpoints,
# the non-finite guard); their one line is the whole story.
USER_ERRORS = (ValueError, KeyError, OSError, ImportError, FloatingPointError)


def _debug(argv=None) -> bool:
    if os.environ.get("JDD_DEBUG", "").lower() in ("1", "true", "yes"):
        return True
    try:
        return bool(FLAGS.verbose)
    except flags.Error:  # not parsed (yet)
        return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in (argv or sys.argv))


class _NoTraceback(logging.Filter):
    """Keeps a library's error line but not its traceback (orbax logs one per background thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _quiet_tracebacks() -> None:
    """Without --verbose, no traceback reaches the console: library log records lose theirs, and
    exceptions in background threads or callbacks (orbax's async writers after a failed write print
    dozens) become one debug line each. The error that ends the run is still printed, as one line."""
    quiet = _NoTraceback()
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)
    debug = logging.getLogger("jdd").debug
    sys.unraisablehook = lambda u: debug("ignored in %r: %s", u.object, u.exc_value)
    import threading
    threading.excepthook = lambda a: debug("exception in thread %s: %s", a.thread and a.thread.name, a.exc_value)


def _close_progress_bars() -> None:
    """Closes open tqdm bars now, so that their last redraw does not follow the error line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass


def _last_line(line: str, status: int) -> None:
    """Prints ``line`` as the last line of stderr and exits with ``status``.

    Logging is switched off first: after a failed write, orbax's background tasks can still be
    collected at exit, and asyncio logs "Task exception was never retrieved" for each, after the
    line that says what happened (--verbose keeps those records)."""
    _close_progress_bars()
    if not _debug():
        logging.disable(logging.CRITICAL)
    sys.stdout.flush()
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()
    sys.exit(status)


def fail(message: str, status: int) -> None:
    """Prints ``jdd: error: MESSAGE`` as the last line of stderr and exits with ``status``."""
    _last_line(f"jdd: error: {' '.join(message.split())}", status)


# ------------------------------------------------------------------------------------------------
# Flag errors
# ------------------------------------------------------------------------------------------------
def _config_flag(argv) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a[len("--config="):]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _override_keys(argv) -> list[str]:
    keys = []
    for i, a in enumerate(argv):
        if a.startswith("--config."):
            keys.append(a[len("--config."):].partition("=")[0])
        elif a.startswith("--noconfig."):
            keys.append(a[len("--noconfig."):])
    return keys


def _all_keys(node, prefix="") -> list[str]:
    out = []
    for k, v in node.items():
        out.append(prefix + k)
        if hasattr(v, "items"):
            out += _all_keys(v, prefix + k + ".")
    return out


def unknown_key_message(config, key: str) -> str | None:
    """``unknown config key 'a.b' ...`` when ``--config.a.b`` names no key of ``config``, else None."""
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if hasattr(node, "items") and part in node:
            node = node[part]
            continue
        where = ".".join(parts[:depth])
        siblings = sorted(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(key, _all_keys(config), n=1, cutoff=0.6)
        hint = f"did you mean --config.{close[0]}?" if close else (
            f"keys under '{where or 'config'}': {', '.join(siblings)}" if siblings else
            f"'{where}' is a value, not a section")
        return f"unknown config key '{key}' (--config.{key}); {hint}"
    return None


def flag_error_message(err: BaseException, argv) -> str:
    """One line for a flag-parsing failure, naming the config file, argument or key at fault."""
    spec = _config_flag(argv)
    if spec is None:
        return "--config is required: pass --config=configs/NAME.py[:ARGS] (and --workdir=DIR)"
    from jdd import config as config_lib
    path, _, arg = spec.partition(":")
    try:
        config = config_lib.from_file(path, arg or None)
    except Exception as load_err:  # noqa: BLE001 - every failure of a config file is the user's to fix
        return f"--config={spec}: {_text(load_err)}"
    for key in _override_keys(argv):
        message = unknown_key_message(config, key)
        if message:
            return message
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def parse_flags(argv):
    """absl's flag parsing with one-line errors (ml_collections raises deep in absl for a bad key)."""
    try:
        return FLAGS(argv)
    except Exception as err:  # noqa: BLE001 - absl, ml_collections and the config file all raise here
        if _debug(argv):
            raise
        fail(flag_error_message(err, argv), USAGE_STATUS)


# ------------------------------------------------------------------------------------------------
# Run errors
# ------------------------------------------------------------------------------------------------
def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _disk_full(err: BaseException) -> tuple[bool, str | None]:
    """Whether ``err`` (or what caused it) is "no space left on device", and the file it names."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True, e.filename
        if "No space left on device" in str(e) or "ENOSPC" in str(e):
            # TensorStore (orbax) errors are ValueErrors that quote the file: 'local file "/path"'.
            quoted = re.search(r'file "([^"]+)"', str(e))
            return True, getattr(e, "filename", None) or (quoted and quoted.group(1))
    return False, None


def _text(err: BaseException) -> str:
    """An error's message; a KeyError's without the quotes str() adds, and named when it is a bare key."""
    if isinstance(err, KeyError) and err.args:
        key = err.args[0]
        return key if isinstance(key, str) and " " in key else f"missing key {key!r}"
    return str(err).strip()


def error_message(err: BaseException, workdir: str | None) -> tuple[str, int]:
    """(one line, exit status) for an error that ended a run."""
    if getattr(err, "one_line", False):  # written for the user where it was raised (e.g. a full cache disk)
        return str(err), USAGE_STATUS
    full, path = _disk_full(err)
    if full:
        where = path or workdir or "the run's files"
        return (f"no space left on device while writing {where}; free space there or use another --workdir "
                f"(checkpoints already written are kept, and the same command resumes)", USAGE_STATUS)
    if isinstance(err, USER_ERRORS):
        text = _text(err)
        if isinstance(err, OSError) and err.filename and err.filename not in text:
            text = f"{err.filename}: {err.strerror or text}"
        return text or type(err).__name__, USAGE_STATUS
    first = (str(err).strip().splitlines() or [""])[0]
    return (f"internal error ({type(err).__name__}: {first}); rerun with --verbose for the traceback and "
            f"report it", BUG_STATUS)


def _single_process(config) -> bool:
    from jdd import parallel
    return not (config.parallel.multihost or parallel.multihost_from_env())


def run(config, workdir: str, mode: str, eval_npz: str | None = None, eval_set: str | None = None):
    """Validates, checks and locks the workdir, then runs (what ``main`` does after flag parsing)."""
    from jdd import signals
    with signals.handled():  # SIGTERM / SIGINT stop at a safe point and say what was kept
        return _run(config, workdir, mode, eval_npz, eval_set)


def _run(config, workdir: str, mode: str, eval_npz: str | None, eval_set: str | None):
    from jdd import validation, workdir as workdir_lib
    validation.validate_config(config, check_paths=mode != "export", mode=mode)  # export reads no data or backbone
    path = workdir_lib.prepare_workdir(workdir)
    import jax
    # Compiled steps are cached on disk, so a resumed or repeated run starts without recompiling.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir",
                          os.environ.get("JDD_JAX_CACHE", os.path.expanduser("~/.cache/jdd/jax")))
    from jdd import distill  # after flag parsing, so --help is instant
    kw = dict(mode=mode, eval_npz=eval_npz, eval_set=eval_set)
    if not _single_process(config):  # every process shares the workdir: the run locks it on process 0
        return distill.run(config, path, **kw)
    with workdir_lib.lock(path):
        return distill.run(config, path, **kw)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags are written --name=value", USAGE_STATUS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # orbax and tfds log every file operation at INFO through absl; keep the console for progress.
    logging.getLogger("absl").setLevel(logging.WARNING)
    if not _debug():
        _quiet_tracebacks()
    try:
        config = FLAGS.config
        config.keys()  # a config file that failed to load raises on first use, not while parsing
    except Exception as err:  # noqa: BLE001
        if _debug():
            raise
        fail(flag_error_message(err, sys.argv), USAGE_STATUS)
    from jdd import signals
    try:
        run(config, FLAGS.workdir, FLAGS.mode, FLAGS.eval_npz, FLAGS.eval_set)
    except signals.Interrupted as err:  # one line saying where the run stopped and what was kept
        _last_line(f"jdd: {err}", err.status)
    except KeyboardInterrupt:
        if _debug():
            raise
        fail("interrupted; the same command resumes from the last checkpoint", 130)
    except Exception as err:  # noqa: BLE001 - turned into one line; --verbose shows the traceback
        if _debug():
            raise
        message, status = error_message(err, FLAGS.workdir)
        fail(message, status)


def cli():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
