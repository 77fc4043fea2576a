"""Checkpoints of the distillation state, with automatic resume (a thin orbax wrapper).

The state is a plain pytree (synthetic parameters, label logits, method parameters, optimiser
states, step, rng). The frozen backbone is never part of it. Beside each state orbax stores a small
JSON ``meta`` item (the config the run was started with), so that resuming a workdir with a
different, incompatible config fails with a clear message instead of silently mixing runs.

Saving is asynchronous in orbax; ``close`` waits for the last save so a finished run never loses
its final state. Orbax coordinates multi-host saves itself (every process calls ``save``).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves every ``every`` steps into ``directory``, keeping the last ``keep``."""

    def __init__(self, directory: str, *, every: int, keep: int):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(1, every), create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves when ``step`` is on the interval (or ``force``); returns whether it saved."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force)

    def restore_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, target: Any) -> Any:
        """Restores the state saved at ``step`` into the structure, shapes and shardings of ``target``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return out["state"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
