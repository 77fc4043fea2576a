"""Checkpoints of the distillation state, with automatic resume (a thin orbax wrapper).

The state is a plain pytree (synthetic parameters, label logits, method parameters, optimiser
states, step, rng). The frozen backbone is never part of it. Beside each state orbax stores a small
JSON ``meta`` item (the config the run was started with), so that resuming a workdir with a
different, incompatible config fails with a clear message instead of silently mixing runs.

Which steps are saved is decided here, not by orbax: orbax's default policy also saves the first
step it sees, which after a non-finite step was the only checkpoint "kept". A step is saved when it
is a multiple of ``every``, or when the caller forces it; the caller saves only finite states.

Resuming (:meth:`Checkpointer.restore_latest`) tries the newest step first and falls back to older
ones when a step cannot be read (a truncated or missing file after a crash or a full disk); the
damaged step directory is moved aside into ``<directory>.damaged/`` so that later saves of that step
number succeed, and a warning names both steps.

Saving is asynchronous in orbax; ``close`` waits for the last save so a finished run never loses
its final state. Orbax coordinates multi-host saves itself (every process calls ``save``).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("jdd")

# Any failure to read a step counts as damage: orbax re-raises TensorStore's read errors (a truncated
# chunk) as a bare Exception, a missing item as KeyError, an empty JSON as ValueError. A config
# mismatch (meta_check) is not read inside these guards and propagates. Nothing is moved aside unless
# an older step restores with the same target, so a bug in the target cannot quarantine good steps.
DAMAGE_ERRORS = (Exception,)


class CheckpointsDamaged(OSError):
    """Every checkpoint in the directory failed to restore (its files are unreadable)."""


class Checkpointer:
    """Saves every ``every`` steps into ``directory``, keeping the last ``keep``."""

    def __init__(self, directory: str, *, every: int, keep: int):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint interval {every} and number kept {keep} must be >= 1")
        self.directory = os.path.abspath(directory)
        self.every = int(every)
        self._keep = int(keep)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True)
        return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` writes: ``step`` is a positive multiple of ``every``."""
        return step > 0 and step % self.every == 0

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves when ``step`` is on the interval (or ``force``); returns whether it saved.

        Only a multiple of ``every`` (or a forced step) is written: never "the first step", which is
        what orbax's own policy adds. The caller passes finite states only; a step already on disk is
        not written again.
        """
        if not (force or self.should_save(step)) or step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True)

    def restore_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, target: Any) -> Any:
        """Restores the state saved at ``step`` into the structure, shapes and shardings of ``target``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return out["state"]

    def restore_latest(self, target: Any | Callable[[int], Any],
                       meta_check: Callable[[dict], None] | None = None) -> tuple[int | None, Any, dict | None]:
        """``(step, state, meta)`` of the newest readable checkpoint; ``(None, None, None)`` when there is none.

        target: a state pytree with the structure, shapes and shardings to restore into, or a function
          ``step -> target`` when the structure depends on the step (e.g. the pyramid levels grown by then).
        meta_check: called with each candidate's meta before its state is read; whatever it raises
          (e.g. "made with a different config") propagates: only damaged files fall back.
        Damaged steps are warned about (naming the step that is used instead) and moved to
        ``<directory>.damaged/``. Raises CheckpointsDamaged when no step can be read.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        damaged: list[tuple[int, str]] = []
        for step in steps:
            try:
                meta = self.restore_meta(step)
            except DAMAGE_ERRORS as err:
                damaged.append((step, _reason(err)))
                continue
            if meta_check is not None:
                meta_check(meta)
            try:
                state = self.restore(step, target(step) if callable(target) else target)
            except DAMAGE_ERRORS as err:
                damaged.append((step, _reason(err)))
                continue
            if damaged:
                names = ", ".join(f"step {s} ({why})" for s, why in damaged)
                log.warning("checkpoint(s) %s in %s could not be read; resuming from step %d instead (the "
                            "damaged ones are moved to %s)", names, self.directory, step, self.damaged_dir)
                self._quarantine([s for s, _ in damaged])
            return step, state, meta
        if damaged:
            names = ", ".join(f"step {s} ({why})" for s, why in damaged)
            raise CheckpointsDamaged(
                f"no checkpoint in {self.directory} can be read: {names}; move that directory away to start "
                f"over, or use another --workdir")
        return None, None, None

    @property
    def damaged_dir(self) -> str:
        return self.directory.rstrip(os.sep) + ".damaged"

    def _quarantine(self, steps: list[int]) -> None:
        """Moves damaged step directories aside (process 0; the others wait for the new listing)."""
        if jax.process_index() == 0:
            os.makedirs(self.damaged_dir, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                src = os.path.join(self.directory, str(step))
                if os.path.exists(src):
                    shutil.move(src, os.path.join(self.damaged_dir, f"{step}-{stamp}"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("jdd_checkpoint_quarantine")
        self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _reason(err: BaseException) -> str:
    """The first line of an error, shortened: TensorStore messages run to several lines."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."
