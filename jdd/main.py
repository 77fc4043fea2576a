"""Command line: ``python -m jdd.main --config=configs/NAME.py[:ARGS] --workdir=DIR [--mode=...]``.

Only parses flags and calls :func:`jdd.distill.run`, which tests call directly too. Config values
can be overridden with ``--config.a.b=value``; the config is locked, so an unknown key is an error.
"""
from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:args])",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, logs, distilled set, results")
flags.DEFINE_enum("mode", "distill", ["distill", "eval", "baselines"],
                  "distill (then evaluate), eval (the workdir's distilled set), or baselines")
flags.DEFINE_string("eval_npz", None, "with --mode=eval: evaluate this distilled.npz instead")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # orbax and tfds log every file operation at INFO through absl; keep the console for progress.
    logging.getLogger("absl").setLevel(logging.WARNING)
    import jax
    # Compiled steps are cached on disk, so a resumed or repeated run starts without recompiling.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir",
                          os.environ.get("JDD_JAX_CACHE", os.path.expanduser("~/.cache/jdd/jax")))
    from jdd import distill  # after flag parsing, so --help is instant
    distill.run(FLAGS.config, FLAGS.workdir, mode=FLAGS.mode, eval_npz=FLAGS.eval_npz)


def cli():
    app.run(main)


if __name__ == "__main__":
    cli()
