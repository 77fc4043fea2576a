"""One accelerator check in a few minutes: backbone throughput, distillation steps, protocol evaluation.

    python launch/device_check.py [--out device_check.json] [--budget-s 390]   # one GPU, under 8 minutes
    python launch/device_check.py --tiny                                       # CPU, a tiny ViT, seconds

Measures, on synthetic images (no dataset, no hub download), and prints one markdown table:

- backbone: images/s of the forward and of forward + backward to the input (what distillation needs),
  DINOv2 ViT-S/14 and ViT-B/14 shapes at 224 px, float32 and bfloat16, batch 128, 256, 512;
- encode: the feature-cache encoding rate at the eval batch (host images -> device -> host features,
  as jdd's feature cache does, JPEG decoding excluded) and the projected time for ImageNet-1K's 1.28 M;
- steps: s/step and peak device memory of jdd's own distillation step (``jdd.loop.build_step``: clp,
  lgm with cached and with encoded real features, sfm) at ImageNet-100 (100 images) and ImageNet-1K
  (1000 images) sizes, ViT-B/14, 224 px, LGM's 10 augmented copies per image;
- eval: wall time of the protocol evaluation (jdd.probe, full mode, 5 seeds, 1000 epochs) of 100 and
  1000 images, measured when it fits the budget, else projected from a few epochs (labelled).

Everything is compiled once and timed after a warm-up call (``block_until_ready``). Weights: ViT-S/14
is the real DINOv2-S from ``--dinov2s`` when given or present (.cache/dinov2s), else random; ViT-B/14 is
always random with the real shape. Each row is labelled.

Time guards. ``--budget-s`` is split over the sections (shares in ``SHARES``; time a section leaves
unused goes to the later ones). Within a section, the cases of a ladder run smallest first (backbone:
one batch size of every ladder before the next; steps: a method's ImageNet-1K case right after its
ImageNet-100 one), and a case is skipped (and listed, with the reason) when the projection from the
previous size of its ladder (compile time and per-call time scaled by size) exceeds the time left, after
an OOM or error at a smaller size, or when the throughput gained less than 5% from the previous batch.
Every case runs in a worker process that the parent kills ``--grace-s`` after its section's deadline.
Step cases get one worker each on an accelerator (``--isolate case``): the allocator's peak
(``memory_stats()["peak_bytes_in_use"]``, which JAX cannot reset) then belongs to that case alone.

On a machine without internet access and without ml_collections, copy what the check needs beside the
repository first (``--pack-dinov2s`` writes a float16 copy of the DINOv2-S checkpoint, small enough to
travel with the code):

    mkdir -p .devcheck && cp -r .venv/lib/python3*/site-packages/ml_collections .devcheck/
    python launch/device_check.py --pack-dinov2s .devcheck/dinov2s

then, on the accelerator machine:

    PYTHONPATH=.devcheck python3 launch/device_check.py --dinov2s .devcheck/dinov2s --out device_check.json

The table lists what the budget skipped; a second call can spend the rest of a time budget on one
section, e.g. ``--sections steps --budget-s 390`` (or ``--methods lgm``, ``--dtype bfloat16``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN1K_TRAIN_IMAGES = 1_281_167
SECTIONS = ("backbone", "encode", "steps", "eval")
SHARES = {"backbone": 0.2, "encode": 0.05, "steps": 0.55, "eval": 0.2}  # of the budget left at each start
SATURATION = 0.05      # a backbone ladder stops when a doubled batch gains less than this
COMPILE_SLACK = 1.2    # projected compile time = this x the previous rung's
XLA_SOURCE = "XLA memory_analysis"  # arguments + outputs + temporaries - aliased, of the compiled program
ROW = "@@row "         # worker -> parent: one JSON result per line
INFO = "@@info "


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run: the GPU check, or its tiny CPU twin (same code paths, small shapes)."""
    tiny: bool
    models: tuple           # (label, dinov2 variant); the first is the one real weights may replace
    step_model: str         # variant used by steps, eval and encode's reference
    px: int                 # image (crop) size fed to the backbone
    syn_px: int             # synthetic image size (LGM: 256, cropped to px by the augmentation)
    dtypes: tuple
    ladder: tuple           # backbone batch sizes
    steps: tuple            # (name, classes, accum_chunks, remat)
    big_ladders: tuple | None  # step ladders that go on past the first size (None: all)
    copies: int             # augmented copies per synthetic image (LGM's augs_per_batch)
    cache_per_class: int    # random cached real features per class (cache mode)
    evals: tuple            # (images = classes, 1 image per class)
    eval_epochs: int
    eval_probe_epochs: int  # epochs timed to project eval_epochs
    eval_seeds: int
    test_images: int
    encode_batch: int
    min_time_s: float       # timed calls continue until this much time (at most max_reps calls)
    max_reps: int
    budget_s: float
    grace_s: float
    isolate: str


FULL = Settings(
    tiny=False, models=(("ViT-S/14", "S/14"), ("ViT-B/14", "B/14")), step_model="B/14", px=224, syn_px=256,
    dtypes=("float32", "bfloat16"), ladder=(128, 256, 512),
    # Memory plan, ViT-B/14 float32: ~350 MiB of activations per augmented copy (docs/scaling.md, measured on CPU),
    # ~35 MiB with remat (our estimate: 12 saved block inputs of 257 x 768 floats + one block's working
    # set). ImageNet-100's 1,000 copies in one pass with remat (~35 GiB); ImageNet-1K's 10,000 in 10
    # chunks of 1,000 with remat. Either way about 2 forwards + 1 backward per copy.
    steps=(("ImageNet-100", 100, 1, True), ("ImageNet-1K", 1000, 10, True)), big_ladders=None, copies=10,
    cache_per_class=1300, evals=(100, 1000), eval_epochs=1000, eval_probe_epochs=5, eval_seeds=5,
    test_images=10_000, encode_batch=256, min_time_s=0.5, max_reps=20, budget_s=390.0, grace_s=15.0,
    isolate="case")
# The same cases at toy sizes, every code path in CPU seconds: one tiny model stands for both ViTs, and
# only LGM with real images (chunked real and synthetic passes) goes on to the second, chunked size.
TINY = dataclasses.replace(
    FULL, tiny=True, models=(("ViT-S/14 [tiny: dinov2 test]", "test"),), step_model="test", px=32, syn_px=32,
    dtypes=("float32",), ladder=(4, 16),
    steps=(("ImageNet-100 [tiny: 2 classes]", 2, 1, True), ("ImageNet-1K [tiny: 4 classes]", 4, 10, True)),
    big_ladders=("step/lgm/backbone",),
    cache_per_class=8, evals=(4,), eval_epochs=4, eval_probe_epochs=2, test_images=64, min_time_s=0.0,
    max_reps=2, budget_s=600.0, grace_s=10.0, isolate="section")
# In order of interest: LGM as published (real images through the backbone), CLP, SFM, LGM on cached features.
STEP_LADDERS = (("lgm", "backbone"), ("clp", "cache"), ("sfm", "cache"), ("lgm", "cache"))


# ------------------------------------------------------------------------------------------ the plan

def plan(section: str, s: Settings, methods: list[str]) -> list[dict]:
    """The cases of a section. A case is a plain dict: kind, ladder (the cases of one ladder grow in
    ``size``), rung, size, and what its runner needs. Backbone cases run rung-major (every ladder's
    smallest batch first), step cases ladder-major (each method at both sizes before the next)."""
    cases = []
    if section == "backbone":
        for rung, batch in enumerate(s.ladder):
            for model, variant in s.models:
                for dtype in s.dtypes:
                    for mode in ("forward", "forward+backward"):
                        cases.append(dict(kind="backbone", ladder=f"backbone/{model}/{dtype}/{mode}", rung=rung,
                                          size=batch, model=model, variant=variant, dtype=dtype, mode=mode))
    elif section == "encode":
        for model, variant in s.models:
            for dtype in s.dtypes:
                cases.append(dict(kind="encode", ladder=f"encode/{model}/{dtype}", rung=0, size=s.encode_batch,
                                  model=model, variant=variant, dtype=dtype))
    elif section == "steps":  # ladder-major: a method's ImageNet-1K case right after its ImageNet-100 one
        for method, real in STEP_LADDERS:
            if method not in methods:
                continue
            ladder = f"step/{method}/{real}"
            for rung, (name, classes, chunks, remat) in enumerate(s.steps):
                if rung and s.big_ladders is not None and ladder not in s.big_ladders:
                    break
                cases.append(dict(kind="step", ladder=ladder, rung=rung, size=classes,
                                  size_name=name, method=method, real=real, classes=classes, chunks=chunks,
                                  remat=remat, dtype=s.dtypes[0]))
    elif section == "eval":
        for rung, n in enumerate(s.evals):
            cases.append(dict(kind="eval", ladder="eval", rung=rung, size=n, images=n, dtype=s.dtypes[0]))
    return cases


# ------------------------------------------------------------------------------------------ time guard

def projected_s(prev: dict, case: dict) -> float:
    """Seconds ``case`` should take, from the previous rung of its ladder: set-up and calls scale with
    size, compilation barely does; one warm-up and one timed call at least."""
    ratio = case["size"] / prev["size"]
    return (prev.get("build_s", 0.0) * ratio + COMPILE_SLACK * prev.get("compile_s", 0.0)
            + 2 * prev.get("run_s", 0.0) * ratio + prev.get("worker_s", 0.0))


def skip_reason(case: dict, history: list[dict], remaining_s: float) -> str | None:
    """Why ``case`` must not run now (None: run it). Pure: decided from earlier rows and the time left."""
    if remaining_s <= 0:
        return "the section's time was used up"
    prior = [r for r in history if r["ladder"] == case["ladder"] and r["rung"] < case["rung"]]
    if not prior:
        return None
    prev = prior[-1]
    if prev["status"] != "ok":
        return f"stopped: size {prev['size']} was {prev['status']}"
    if case["kind"] == "backbone" and len(prior) > 1 and prior[-2]["status"] == "ok":
        gain = prev["images_per_s"] / prior[-2]["images_per_s"] - 1.0
        if gain < SATURATION:
            return f"saturated: batch {prior[-2]['size']} -> {prev['size']} gained {100 * gain:+.0f}%"
    est = projected_s(prev, case)
    if est > remaining_s:
        return f"projected {est:.0f} s > {remaining_s:.0f} s left in the section"
    return None


def skipped(case: dict, reason: str) -> dict:
    return dict(case, status="skipped", reason=reason)


# ------------------------------------------------------------------------------------------ parent

def run_section(cases: list[dict], deadline: float, s: Settings, args, history: list[dict],
                info: dict) -> list[dict]:
    """Runs the cases in worker processes (one per case, or one for the section); returns their rows."""
    if s.isolate == "case" and cases and cases[0]["kind"] == "step":
        jobs = [[c] for c in cases]
    else:
        jobs = [cases] if cases else []
    rows = []
    for job in jobs:
        reason = skip_reason(job[0], history + rows, deadline - time.time())
        if reason and (len(job) == 1 or deadline <= time.time()):  # decided here: no worker started for nothing
            rows += [skipped(c, reason) for c in job]
            continue
        rows += _run_worker(job, deadline, s, args, history + rows, info)
    return rows


def _run_worker(cases, deadline, s, args, history, info) -> list[dict]:
    job = dict(cases=cases, history=history, deadline=deadline, dinov2s=args.dinov2s,
               isolated=len(cases) == 1, spawned=time.time(), settings=dataclasses.asdict(s))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # the device for the case, not 75% of it
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", f.name], stdout=subprocess.PIPE,
                            text=True, env=env, cwd=os.getcwd())
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    rows, killed, kill_at = [], False, deadline + s.grace_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, kill_at - time.time()))
        except queue.Empty:
            proc.kill()  # our own worker, past its section's deadline + grace
            killed = True
            break
        if line is None:
            break
        if line.startswith(ROW):
            rows.append(json.loads(line[len(ROW):]))
        elif line.startswith(INFO):
            info.update(json.loads(line[len(INFO):]))
        else:
            sys.stderr.write(line)
    rc = proc.wait()
    os.unlink(f.name)
    why = (f"worker killed {s.grace_s:g} s after the section's deadline" if killed
           else f"worker exited with code {rc} before this case")
    return rows + [skipped(c, why) for c in cases[len(rows):]]


def _pump(stream, lines: queue.Queue) -> None:
    """Moves a worker's output lines into a queue (None at the end), so the parent can wait with a timeout."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return {}
    if args.pack_dinov2s:
        pack_checkpoint(args.dinov2s or ".cache/dinov2s", args.pack_dinov2s)
        return {}
    s = TINY if args.tiny else FULL
    s = dataclasses.replace(s, budget_s=args.budget_s or s.budget_s, grace_s=args.grace_s or s.grace_s,
                            isolate=args.isolate or s.isolate, dtypes=_dtypes(args.dtype, s))
    if args.dinov2s is None and not s.tiny and os.path.isfile(os.path.join(".cache", "dinov2s", "config.json")):
        args.dinov2s = os.path.join(".cache", "dinov2s")
    sections = [x for x in args.sections.split(",") if x]
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    t0, rows, info = time.time(), [], {}
    for i, name in enumerate(sections):
        left = s.budget_s - (time.time() - t0)
        share = SHARES[name] / sum(SHARES[x] for x in sections[i:])
        deadline = time.time() + max(0.0, left) * share
        methods = [m for m in args.methods.split(",") if m and m in info.get("methods", [m])]
        rows += run_section(plan(name, s, methods), deadline, s, args, rows, info)
    result = dict(device=info.get("device"), backend=info.get("backend"), jax_version=info.get("jax_version"),
                  versions=info.get("versions"), device_memory_gib=info.get("device_memory_gib"),
                  weights=sorted({f"{r.get('model', s.step_model)}: {r['weights']}" for r in rows if r.get("weights")}),
                  tiny=s.tiny, budget_s=s.budget_s, wall_s=time.time() - t0,
                  settings=dataclasses.asdict(s), rows=rows,
                  skipped=[f"{case_name(r)}: {r['reason']}" for r in rows if r["status"] != "ok"])
    result["markdown"] = render(result)
    print(result["markdown"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out}")
    return result


def _dtypes(arg: str | None, s: Settings) -> tuple:
    """--dtype puts one compute dtype first (steps and eval use the first); the backbone rows use both."""
    if arg is None:
        return s.dtypes
    if arg not in s.dtypes:
        raise SystemExit(f"--dtype must be one of {s.dtypes}, got {arg!r}")
    return (arg,) + tuple(d for d in s.dtypes if d != arg)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny ViT, small images, few epochs: a CPU run in seconds")
    p.add_argument("--out", default="device_check.json", help="where to write the JSON results")
    p.add_argument("--budget-s", type=float, default=None, help="total time budget (default 390, tiny 600)")
    p.add_argument("--grace-s", type=float, default=None, help="a worker is killed this long after its deadline")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--methods", default="clp,lgm,sfm", help="methods of the steps section (sfm: when registered)")
    p.add_argument("--dtype", default=None, help="compute dtype of steps and eval (default float32)")
    p.add_argument("--isolate", choices=("case", "section"), default=None,
                   help="one worker per step case (exact per-case peak memory; default on the full run) or per section")
    p.add_argument("--dinov2s", default=None, help="real DINOv2-S checkpoint dir (default .cache/dinov2s if present)")
    p.add_argument("--pack-dinov2s", default=None, metavar="DST",
                   help="write a float16 copy of --dinov2s to DST (small enough to travel) and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def pack_checkpoint(src: str, dst: str) -> None:
    """A float16 copy of a Hugging Face safetensors checkpoint (jdd converts tensors to float32 on load)."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file
    if not os.path.isfile(os.path.join(src, "model.safetensors")):
        raise SystemExit(f"no model.safetensors in {src}; pass --dinov2s DIR (a Hugging Face checkpoint)")
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()},
              os.path.join(dst, "model.safetensors"))
    for name in ("config.json", "preprocessor_config.json"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst)
    print(f"wrote a float16 copy of {src} to {dst}")


# ------------------------------------------------------------------------------------------ report

def case_name(r: dict) -> str:
    if r["kind"] == "backbone":
        return f"{r['model']} {r['dtype']} {r['mode']}, batch {r['size']}"
    if r["kind"] == "encode":
        return f"{r['model']} {r['dtype']}, batch {r['size']}"
    if r["kind"] == "step":
        extra = f"k={r['chunks']}" + (", remat" if r["remat"] else "")
        return f"{r['method']} (real: {r['real']}), {r['size_name']}, {r['dtype']}, {extra}"
    return f"protocol evaluation of {r['images']} images (1 per class), {r['dtype']}"


def _result(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"]
    if r["kind"] == "backbone":
        return f"{r['images_per_s']:,.0f} img/s ({1e3 * r['run_s']:.1f} ms/batch)"
    if r["kind"] == "encode":
        return (f"{r['images_per_s']:,.0f} img/s from host ({r['device_images_per_s']:,.0f} on device); "
                f"1.28 M images: {r['in1k_encode_min']:.1f} min")
    if r["kind"] == "step":
        return f"{r['s_per_step']:.3g} s/step"
    return (f"{r['wall_s']:,.0f} s {r['wall_kind']} ({r['seeds']} seeds x {r['epochs']} epochs; "
            f"{r['views_per_s']:,.0f} views/s)")


def _memory(r: dict) -> str:
    if r["status"] != "ok" or r.get("memory_gib") is None:
        return ""
    text = f"{r['memory_gib']:.3g} ({r['memory_source']})"
    if r["memory_source"] != XLA_SOURCE and r.get("xla_gib") is not None:
        text += f"; {XLA_SOURCE} {r['xla_gib']:.3g}"
    return text


def _notes(r: dict) -> str:
    if r["status"] != "ok":
        return r.get("reason", "")
    notes = [r["weights"]] if r.get("weights") else []
    if r["kind"] == "eval":
        notes.append(f"{r['images']} classes; test split as {r['test_images']} given features (see encode)")
    if r["kind"] == "step":
        real = {"none": "no real batch (method.prepare's class means)", "cache": "cached real features",
                "backbone": "real images (on device) through the backbone"}[r["real_source"]]
        notes.append(f"{r['images']} images x {r['copies']} copies; {real}, {r['real_per_step']}/step")
    return "; ".join(notes)


def render(result: dict) -> str:
    head = [f"device: {result['device']} ({result['backend']}, {result.get('device_memory_gib') or '?'} GiB); "
            f"jax {result['jax_version']}; {result.get('versions')}",
            f"mode: {'tiny (CPU smoke run, not a measurement of the GPU shapes)' if result['tiny'] else 'full'}; "
            f"budget {result['budget_s']:.0f} s; wall {result['wall_s']:.0f} s", "",
            "| section | case | result | compile (s) | memory (GiB) | notes |", "|---|---|---|---|---|---|"]
    lines = []
    for r in result["rows"]:
        comp = f"{r['compile_s']:.3g}" if r.get("compile_s") is not None and r["status"] == "ok" else ""
        cells = [r["kind"], case_name(r), _result(r), comp, _memory(r), _notes(r)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    tail = ["", f"skipped ({len(result['skipped'])}):"] + [f"- {x}" for x in result["skipped"]]
    return "\n".join(head + lines + tail)


# ------------------------------------------------------------------------------------------ worker

def worker_main(job_path: str) -> None:
    """Runs a job's cases in this (fresh) process; prints one ROW line per case as soon as it is done."""
    with open(job_path) as f:
        job = json.load(f)
    sys.path.insert(0, REPO)
    import jax.numpy as jnp
    jnp.zeros(()).block_until_ready()  # the backend, started before the first case is timed
    s = Settings(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                    for k, v in job["settings"].items()})
    ctx = Worker(s, job)
    _emit(INFO, ctx.info())
    history = list(job["history"])
    worker_s = time.time() - job["spawned"]
    for i, case in enumerate(job["cases"]):
        reason = ctx.skip(case) or skip_reason(case, history, job["deadline"] - time.time())
        if reason:
            row = skipped(case, reason)
        else:
            try:
                row = dict(case, status="ok", **RUNNERS[case["kind"]](ctx, case))
            except Exception as err:  # noqa: BLE001 - an OOM or a failure is a result; the next cases still run
                traceback.print_exc()
                msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                oom = any(k in str(err) for k in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))
                row = dict(case, status="oom" if oom else "error", reason=f"{type(err).__name__}: {msg}")
        if i == 0 and job["isolated"]:
            row["worker_s"] = worker_s  # process start, imports, device: paid again by the next isolated case
        _emit(ROW, row)
        history.append(row)


def _emit(prefix: str, obj: dict) -> None:
    print(prefix + json.dumps(obj), flush=True)


class Worker:
    """What a worker builds once and shares between its cases: the device, its info, the backbones."""

    def __init__(self, s: Settings, job: dict):
        import jax
        self.s, self.job = s, job
        self.device = jax.devices()[0]
        self._backbones = {}

    def info(self) -> dict:
        import flax
        import jax
        import jaxlib

        from jdd import methods
        stats = self.device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        return dict(device=self.device.device_kind, backend=jax.default_backend(), jax_version=jax.__version__,
                    versions=f"jaxlib {jaxlib.__version__}, flax {flax.__version__}, {jax.device_count()} device(s)",
                    device_memory_gib=round(limit / 2**30, 1) if limit else None, methods=sorted(methods.METHODS))

    def skip(self, case: dict) -> str | None:
        from jdd import methods
        if case["kind"] == "step" and case["method"] not in methods.METHODS:
            return f"method {case['method']!r} is not in jdd.methods.METHODS"
        return None

    def backbone(self, case: dict, remat: bool = False):
        """(backbone, weights label): real DINOv2-S for the first model when a checkpoint is given."""
        import jax.numpy as jnp

        from jdd import backbones
        variant = case.get("variant", self.s.step_model)
        real = case.get("model") == self.s.models[0][0] and bool(self.job["dinov2s"]) and not self.s.tiny
        key = (variant, real)
        if key not in self._backbones:
            label = "random weights, real shape" if not self.s.tiny else "random weights, tiny ViT"
            bb = None
            if real:
                try:
                    bb = backbones.load(self.job["dinov2s"])
                    label = f"real DINOv2-S weights ({self.job['dinov2s']})"
                except Exception as err:  # noqa: BLE001 - fall back to random weights, and say so
                    label = f"random weights, real shape (loading {self.job['dinov2s']} failed: {err})"[:200]
            self._backbones[key] = (bb or backbones.create("dinov2", variant), label)
        bb, label = self._backbones[key]
        dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[case["dtype"]]
        return dataclasses.replace(bb, module=bb.module.clone(dtype=dt, remat=remat)), label

    def peak(self) -> tuple[float | None, str | None]:
        stats = self.device.memory_stats() or {}
        if "peak_bytes_in_use" not in stats:
            return None, None
        source = "device peak, this case alone" if self.job["isolated"] else "device peak, worker so far"
        return stats["peak_bytes_in_use"] / 2**30, source


def _compile(ctx: Worker, jitted, *args):
    """(compiled, seconds, XLA's bytes: arguments + outputs + temporaries - aliased, or None).

    Raises MemoryError, before anything runs, when XLA's own count exceeds the device's memory."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - t
    try:
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        total = None
    limit = (ctx.device.memory_stats() or {}).get("bytes_limit")
    if total and limit and total > limit:
        raise MemoryError(f"Out of memory: {XLA_SOURCE} {total / 2**30:.1f} GiB > the device's {limit / 2**30:.1f} GiB")
    return compiled, seconds, total


def _time(call, s: Settings) -> dict:
    """One warm-up call, then timed calls until ``min_time_s`` (median per call). ``call`` blocks."""
    t = time.perf_counter()
    call()
    first = time.perf_counter() - t
    reps = max(1, min(s.max_reps, math.ceil(s.min_time_s / max(first, 1e-9))))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return dict(run_s=statistics.median(times), reps=reps, warmup_s=first)


def _gib(nbytes):
    return None if nbytes is None else nbytes / 2**30


def run_backbone(ctx: Worker, case: dict) -> dict:
    """Images/s of features["embedding"] (forward) or of its gradient w.r.t. the images (+ backward)."""
    import jax
    import jax.numpy as jnp
    bb, label = ctx.backbone(case)
    x = jax.random.uniform(jax.random.PRNGKey(0), (case["size"], ctx.s.px, ctx.s.px, 3))
    features = lambda p, x: bb.apply(p, x)["embedding"]  # noqa: E731

    def fn(p, x):
        if case["mode"] == "forward":
            return features(p, x)
        return jax.grad(lambda x: jnp.sum(features(p, x)))(x)  # what the images' gradient costs
    compiled, compile_s, xla = _compile(ctx, jax.jit(fn), bb.params, x)
    t = _time(lambda: compiled(bb.params, x).block_until_ready(), ctx.s)
    return dict(t, compile_s=compile_s, xla_gib=_gib(xla), memory_gib=_gib(xla), memory_source=XLA_SOURCE,
                images_per_s=case["size"] / t["run_s"], weights=label)


def run_encode(ctx: Worker, case: dict) -> dict:
    """The feature cache's rate: a host batch to the device, features back to the host (no decoding)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    bb, label = ctx.backbone(case)
    host = np.random.default_rng(0).random((case["size"], ctx.s.px, ctx.s.px, 3), dtype=np.float32)
    dev = jnp.asarray(host)
    compiled, compile_s, xla = _compile(ctx, jax.jit(lambda p, x: bb.apply(p, x)["embedding"]), bb.params, dev)
    on_device = _time(lambda: compiled(bb.params, dev).block_until_ready(), ctx.s)
    t = _time(lambda: np.asarray(compiled(bb.params, jnp.asarray(host))), ctx.s)
    rate = case["size"] / t["run_s"]
    return dict(t, compile_s=compile_s, xla_gib=_gib(xla), memory_gib=_gib(xla), memory_source=XLA_SOURCE,
                images_per_s=rate, weights=label,
                device_images_per_s=case["size"] / on_device["run_s"], in1k_encode_min=IN1K_TRAIN_IMAGES / rate / 60)


def build_step(case: dict, backbone, s: Settings):
    """jdd's distillation step for one case, from the library's own builder (``jdd.loop.build_step``):
    the config of the case -> the run's compiled step (state donated, split leaves kept split), the state
    grown to the full pyramid (the steady-state cost), random stand-in real inputs already on the device
    (loading them from disk is not timed). Returns (step_fn, args, info): ``step_fn(*args) -> (state,
    metrics)``, args[0] the state. ``backbone`` comes with the case's compute dtype and remat applied, as
    jdd.context builds it.
    """
    from jdd import config as jc, context, loop, parallel
    c = jc.base_config()
    jc.set_method(c, case["method"])
    c.data.crop_res, c.syn.res, c.syn.ipc = s.px, s.syn_px, 1
    c.syn.extent = 1  # a level per step: the full pyramid after a few grow calls
    c.augment.copies, c.augment.accum_chunks = s.copies, case["chunks"]
    c.real.source = case["real"]
    c.parallel.num_devices = 1
    built = loop.build_step(c, case["classes"], context.embedder(backbone, c.backbone.feature), backbone.params,
                            mesh=parallel.make_mesh(1), full_pyramid=True,
                            cache_rows=s.cache_per_class * case["classes"])
    spec = built.spec
    n_real = spec.real_per_class * spec.num_classes if spec.real_source != "none" else 0
    info = dict(images=spec.num_images, copies=spec.copies, real_per_step=n_real, real_source=spec.real_source)
    return built.fn, built.args, info


def run_step(ctx: Worker, case: dict) -> dict:
    import jax
    import numpy as np
    t0 = time.perf_counter()
    bb, _ = ctx.backbone(case, remat=case["remat"])
    fn, args, info = build_step(case, bb, ctx.s)
    jax.block_until_ready(args)
    build_s = time.perf_counter() - t0
    compiled, compile_s, xla = _compile(ctx, fn, *args)
    state, rest, out = args[0], args[1:], {}
    del args

    def call():
        nonlocal state
        state, metrics = compiled(state, *rest)
        out["loss"] = float(metrics["loss"])  # the host sync that ends the timed call
    t = _time(call, ctx.s)
    if not np.isfinite(out["loss"]):
        raise FloatingPointError(f"the step's loss is {out['loss']}")
    peak, source = ctx.peak()
    if peak is None:  # the backend keeps no memory stats (CPU): XLA's analysis, labelled as such
        peak, source = _gib(xla), XLA_SOURCE
    return dict(t, **info, build_s=build_s, compile_s=compile_s, s_per_step=t["run_s"], loss=out["loss"],
                xla_gib=_gib(xla), memory_gib=peak, memory_source=source, weights="random weights, real shape"
                if not ctx.s.tiny else "random weights, tiny ViT")


def run_eval(ctx: Worker, case: dict) -> dict:
    """jdd.probe.evaluate (full mode) of N images: timed at a few epochs; run at all epochs when it fits."""
    import jax
    import numpy as np

    from jdd import probe
    s, n = ctx.s, case["images"]
    bb, label = ctx.backbone(case)
    cfg = probe.probe_config()
    cfg.mode, cfg.seeds, cfg.out_res, cfg.epochs = "full", s.eval_seeds, s.px, s.eval_probe_epochs
    rng = np.random.default_rng(0)
    images = jax.random.uniform(jax.random.PRNGKey(0), (n, s.syn_px, s.syn_px, 3))
    labels = np.arange(n)  # one image per class
    test = rng.standard_normal((s.test_images, bb.embed_dim)).astype(np.float32)
    test_labels = rng.integers(0, n, s.test_images)
    embed_fn = probe.embedder(bb.apply, bb.params, "embedding")

    def evaluate():
        t = time.perf_counter()
        probe.evaluate(jax.random.PRNGKey(1), images, labels, embed_fn, test, test_labels, num_classes=n, cfg=cfg)
        return time.perf_counter() - t
    first = evaluate()
    run_s = evaluate()  # compiled: the run alone
    per_epoch = run_s / s.eval_probe_epochs
    compile_s = max(first - run_s, 0.0)
    projected = compile_s + per_epoch * s.eval_epochs
    wall, kind = projected, f"projected from {s.eval_probe_epochs} epochs"
    if projected * COMPILE_SLACK < ctx.job["deadline"] - time.time():
        cfg.epochs = s.eval_epochs
        wall, kind = evaluate(), "measured"
    peak, source = ctx.peak()  # None on CPU; on a GPU the peak of this worker so far (sizes ascend)
    return dict(run_s=run_s, compile_s=compile_s, wall_s=wall, wall_kind=kind, projected_s=projected,
                memory_gib=peak, memory_source=source,
                per_epoch_s=per_epoch, seeds=s.eval_seeds, epochs=s.eval_epochs, weights=label, test_images=s.test_images,
                views_per_s=s.eval_seeds * n / per_epoch)


RUNNERS = {"backbone": run_backbone, "encode": run_encode, "step": run_step, "eval": run_eval}

if __name__ == "__main__":
    main()
