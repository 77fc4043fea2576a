"""Per-device memory of one distillation step (LGM, CLP): a model from the architecture, checked by XLA.

    python launch/memory.py table                    # ImageNet-1K, ViT-B/14 at 224 px: the docs/scaling.md table
    python launch/memory.py table --ipc 10 --devices 64,256 --dtype bfloat16
    python launch/memory.py measure [--depth 12]      # compile jdd's real step on CPU, fit, compare

``table`` evaluates :func:`step_bytes`, a sum of named terms computed from the backbone's sizes
(width D, depth L, heads H, MLP width F, tokens T) and the run's sizes. ``measure`` lowers and
compiles jdd's own jitted step (``jdd.loop.build_step``, the run's step builder) for a grid of
small sizes, without running it, reads XLA's ``compiled.memory_analysis()`` and fits the peak as
``alpha + beta * copies_per_device + beta_r * real_per_device + gamma * images_per_device``,
then prints the fitted coefficients beside the model's.

The model, in bytes per device (n devices, k accumulation chunks, s = 4 for float32 / 2 for
bfloat16 activations; M = classes * ipc synthetic images, b = copies * M / n augmented copies and
b_r = real images per step / n per device; the terms are those ``step_bytes`` returns):

    backbone      4 P                               frozen parameters, replicated
    state         4 * 3 S M / n_s                   images + Adam m, v (n_s = n when the state is
                                                    split over devices, else 1); XLA fuses the
                                                    gradient into the update, so no 4th copy
    decode        4 * 3 R^2 M / n_s                 the decoded images
    crops         4 * 3 c^2 b                       the augmented copies
    activations   s b A / k                         what backprop through the frozen ViT keeps,
                  A = L (10 T D + 3 T F + 2 H T^2)  per layer (counted with jax.ad_checkpoint.
                      + 2 T D                       print_saved_residuals on jdd's ViT): LayerNorm
                                                    centred and scaled inputs (2 x 2 T D), q, k, v
                                                    (3 T D), three more T D products, exact GELU's
                                                    input, exp and erfc (3 T F), softmax's exp and
                                                    probabilities (2 H T^2); the final LayerNorm (2 T D)
    real batch    4 b_r 3 c^2 + max(0, s b_r A_f / k' LGM: the real images; the forward working set
                      - activations)                (A_f = T F + H T^2 per image) is freed before
                                                    the synthetic backward, the peak, unless larger
    cache         4 N V D                           cache mode: the feature cache, replicated
    loss          LGM 4 * 4 D C                     random head and its two gradients
                  CLP 4 (4 M^2 + N_r (D + 2 C))     kernel and solve; real features and logits

with P the backbone's parameter count, S = 3 * sum of pyramid level areas (262,143 floats for
256 px: levels 1, 2, 4, ..., 256), R the synthetic resolution, c the crop size, T = (c/p)^2 + 1
tokens, D width, F MLP width, H heads, L depth, N_r real rows per step. ``augment.accum_chunks`` k
divides the activation term (k' = k when the real batch is encoded in chunks too, else 1), so
total(k) = fixed + max(s b A, s b_r A_f) / k: :func:`chunks_for_budget` solves it for a budget.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

GiB = 2**30


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Arch:
    """The sizes of a ViT that memory depends on."""
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch: int
    prefix_tokens: int = 1  # class token (+ registers)
    params: int = 0         # parameter count (0: computed from the sizes)

    def tokens(self, res: int) -> int:
        return (res // self.patch) ** 2 + self.prefix_tokens

    def param_count(self, res: int) -> int:
        if self.params:
            return self.params
        d, f = self.width, self.mlp_dim
        per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # qkv+out, MLP, LayerNorms
        return self.depth * per_layer + 3 * self.patch**2 * d + d + self.tokens(res) * d + 2 * d


# ViT-B as DINOv2-B/14, CLIP/SigLIP/EVA B/16 at 224 px.
ARCHS = {
    "B/14": Arch(width=768, depth=12, heads=12, mlp_dim=3072, patch=14),
    "B/16": Arch(width=768, depth=12, heads=12, mlp_dim=3072, patch=16),
    "S/14": Arch(width=384, depth=12, heads=6, mlp_dim=1536, patch=14),
    "L/14": Arch(width=1024, depth=24, heads=16, mlp_dim=4096, patch=14),
}


def pyramid_floats(res: int) -> int:
    """Floats per synthetic image of the full pyramid (all levels 1, 2, 4, ..., res)."""
    sizes = [1]
    while sizes[-1] < res:
        sizes.append(min(2 * sizes[-1], res))
    return 3 * sum(r * r for r in sizes)


def activation_floats(arch: Arch, res: int) -> int:
    """Floats backprop keeps per image through the frozen ViT (see the module docstring)."""
    t, d = arch.tokens(res), arch.width
    return arch.depth * (10 * t * d + 3 * t * arch.mlp_dim + 2 * arch.heads * t * t) + 2 * t * d


def forward_floats(arch: Arch, res: int) -> int:
    """Floats of a forward pass's widest moment per image (features only, nothing kept)."""
    t = arch.tokens(res)
    return t * arch.mlp_dim + arch.heads * t * t


def step_bytes(arch: Arch, *, method: str, num_classes: int, ipc: int, copies: int, devices: int,
               chunks: int = 1, real_per_class: int | None = None, syn_res: int = 256, crop: int = 224,
               syn_param: str = "pyramid", shard_state: bool = False, act_bytes: int = 4,
               cache_rows: int = 0, cache_views: int = 1, real_source: str | None = None,
               real_chunks: int = 1) -> dict:
    """Modelled bytes per device of one step, by term (and "total").

    ``method`` "lgm" (real batch encoded in the step unless ``real_source="cache"``) or "clp"
    (cache mode unless ``real_source="backbone"``); ``real_per_class`` defaults to ipc * copies.
    """
    real_source = real_source or ("backbone" if method == "lgm" else "cache")
    m = num_classes * ipc
    n_s = devices if shard_state else 1
    per_img = pyramid_floats(syn_res) if syn_param == "pyramid" else 3 * syn_res**2
    b = copies * m / devices
    r = (real_per_class or ipc * copies) * num_classes / devices
    d = arch.width
    out = {
        "backbone": 4 * arch.param_count(crop),
        "state": 4 * 3 * per_img * m / n_s,
        "decode": 4 * 3 * syn_res**2 * m / n_s,
        "crops": 4 * 3 * crop**2 * b,
        "activations": act_bytes * activation_floats(arch, crop) * b / chunks,
    }
    if real_source == "backbone":
        # The real forward (no backprop) runs before the synthetic backward and its working set is
        # gone at the peak: only the images stay, unless that working set is the larger of the two.
        forward = act_bytes * forward_floats(arch, crop) * r / real_chunks
        out["real batch"] = 4 * 3 * crop**2 * r + max(0.0, forward - out["activations"])
    else:
        out["cache"] = 4 * cache_rows * cache_views * d
    # LGM: random head, its two gradients; CLP: kernel and solve (M x M), real features and logits.
    real_rows = (real_per_class or ipc * copies) * num_classes
    out["loss"] = 4 * (4 * d * num_classes if method == "lgm" else 4 * m * m + real_rows * (d + 2 * num_classes))
    out["total"] = sum(out.values())
    return out


def chunks_for_budget(budget_bytes: float, arch: Arch, **kw) -> int | None:
    """Smallest number of accumulation chunks k whose modelled peak fits ``budget_bytes`` per device.

    The real batch is assumed encoded in as many chunks (k' = k). None when even one copy per chunk
    does not fit (then: more devices, a split state, bfloat16, or fewer copies). ``kw`` as for
    :func:`step_bytes` (without ``chunks``).
    """
    def total(k):
        return step_bytes(arch, **dict(kw, chunks=k, real_chunks=k))["total"]
    # total(k) = fixed + chunked / k exactly (both activation terms scale as 1/k, and so does their max).
    fixed = 2 * total(2) - total(1)
    chunked = total(1) - fixed
    if fixed >= budget_bytes:
        return None
    k = max(1, math.ceil(chunked / (budget_bytes - fixed) - 1e-9))
    copies_per_device = kw["copies"] * kw["num_classes"] * kw["ipc"] / kw["devices"]
    return k if k <= max(copies_per_device, 1) else None


def table(arch: Arch, *, num_classes: int, ipcs, copies_list, devices_list, dtype: str, cache_rows: int,
          budgets_gib=(16, 80)) -> list[dict]:
    """The docs/scaling.md table: per-device GiB at k = 1 (state split over devices) and the k each budget needs."""
    act = 2 if dtype == "bfloat16" else 4
    rows = []
    for method in ("lgm", "clp"):
        for ipc in ipcs:
            for copies in copies_list:
                kw = dict(method=method, num_classes=num_classes, ipc=ipc, copies=copies, act_bytes=act,
                          cache_rows=cache_rows if method == "clp" else 0)
                rep = step_bytes(arch, devices=1, **kw)
                row = dict(method=method, ipc=ipc, copies=copies,
                           state_replicated=(rep["state"] + rep["decode"]) / GiB)
                for n in devices_list:
                    t = step_bytes(arch, devices=n, shard_state=True, **kw)
                    row[f"total@{n}"] = t["total"] / GiB
                    for g in budgets_gib:
                        row[f"k{g}@{n}"] = chunks_for_budget(g * GiB, arch, devices=n, shard_state=True, **kw)
                rows.append(row)
    return rows


def print_table(rows: list[dict], devices_list, budgets_gib=(16, 80)) -> None:
    """Markdown: one row per (method, ipc, copies); per device count the total and the chunks per budget."""
    head = ["method", "ipc", "copies", "state, replicated"]
    for n in devices_list:
        head += [f"{n} dev: GiB (k=1)", f"{n} dev: k for " + " / ".join(f"{g}" for g in budgets_gib) + " GiB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    fmt_k = lambda k: "-" if k is None else str(k)  # noqa: E731
    for r in rows:
        cells = [r["method"].upper(), str(r["ipc"]), str(r["copies"]), f"{r['state_replicated']:.1f}"]
        for n in devices_list:
            cells += [f"{r[f'total@{n}']:.1f}", " / ".join(fmt_k(r[f"k{g}@{n}"]) for g in budgets_gib)]
        print("| " + " | ".join(cells) + " |")


# ------------------------------------------------------------------------------------------------
# The measurement: jdd's real step, compiled (not run) on the CPU
# ------------------------------------------------------------------------------------------------
def compiled_bytes(backbone, *, method: str, num_classes: int, ipc: int, copies: int, real_per_class: int,
                   syn_res: int, crop: int, cache_rows: int, devices: int = 1, shard_state: bool = False) -> dict:
    """XLA's memory analysis of one jitted jdd step at these sizes (per device), in bytes: the library's
    step builder (``jdd.loop.build_step``), abstract inputs, the state at the end of the run (every
    pyramid level present)."""
    from jdd import config as jc, context, loop, parallel

    c = jc.base_config()
    jc.set_method(c, method)
    c.syn.ipc, c.syn.res, c.data.crop_res = ipc, syn_res, crop
    c.augment.copies = copies
    c.real.source = "backbone" if method == "lgm" else "cache"
    c.real.per_class = real_per_class
    c.parallel.shard_state_mb = 0.0 if shard_state else float(2**40)  # split every per-image leaf, or none
    built = loop.build_step(c, num_classes, context.embedder(backbone, c.backbone.feature), backbone.params,
                            mesh=parallel.make_mesh(devices), full_pyramid=True, cache_rows=cache_rows,
                            abstract=True)
    t0 = time.time()
    ma = built.fn.lower(*built.args).compile().memory_analysis()
    out = {k: int(getattr(ma, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                            "alias_size_in_bytes", "temp_size_in_bytes")}
    # Peak: inputs, plus outputs that do not reuse a donated input, plus scratch.
    out["peak"] = out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"] \
        + out["temp_size_in_bytes"]
    out["compile_s"] = round(time.time() - t0, 1)
    return out


# Grid of (method, classes, ipc, copies, real per class): varies copies (b), images (M) and real batch apart.
MEASURE_GRID = [
    ("clp", 4, 1, 2, 1), ("clp", 4, 1, 4, 1), ("clp", 8, 1, 2, 1), ("clp", 8, 1, 4, 1),
    ("lgm", 4, 1, 2, 2), ("lgm", 4, 1, 2, 8), ("lgm", 4, 1, 4, 2), ("lgm", 8, 1, 2, 2), ("lgm", 8, 1, 4, 1),
]


def accelerator_attention() -> None:
    """Makes jdd's ViT trace the attention it runs on GPU/TPU, also on CPU.

    On CPU jdd's ViT splits attention over batch chunks and rematerialises them in the backward pass
    (a CPU cache optimisation), which saves no attention probabilities; GPUs and TPUs run it in one
    piece and keep them. Measuring on CPU what an accelerator would hold needs the latter.
    """
    from jdd.backbones import vit
    vit.attention = vit.dense_attention


def abstract_backbone(arch_name: str, depth: int, crop: int, dtype: str = "float32"):
    """A DINOv2 backbone of the named variant (``depth`` layers) whose parameters are only shapes.

    Lowering needs no parameter values, so nothing of ViT-B's 86M parameters is allocated.
    """
    import jax
    import jax.numpy as jnp
    from jdd import backbones
    from jdd.backbones import convert
    fam = backbones.family_named("dinov2")
    cfg = dataclasses.replace(fam.config(arch_name, crop), depth=depth)
    shapes = backbones.param_shapes(cfg)
    params = convert.unflatten({k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()})
    return backbones.Backbone(module=backbones.ViT(cfg, dtype=jnp.dtype(dtype)), params=params, family="dinov2",
                              name=f"dinov2:{arch_name}", patch_size=cfg.patch_size, image_size=crop,
                              embed_dim=cfg.embed_dim), int(sum(np.prod(v) for v in shapes.values()))


def backbone_sweep(arch_name: str, depths, batches, crop: int, dtype: str = "float32") -> list[dict]:
    """Scratch bytes of d(sum of features^2)/d(images) through the frozen ViT alone, by depth and batch.

    The per-image slope is the activation term of the model (plus the image's own cotangent).
    """
    import jax
    import jax.numpy as jnp
    rows = []
    for depth in depths:
        backbone, _ = abstract_backbone(arch_name, depth, crop, dtype)
        grad = jax.grad(lambda p, x: jnp.sum(backbone.apply(p, x)["embedding"] ** 2), argnums=1)
        for b in batches:
            x = jax.ShapeDtypeStruct((b, crop, crop, 3), jnp.float32)
            temp = jax.jit(grad).lower(backbone.params, x).compile().memory_analysis().temp_size_in_bytes
            rows.append(dict(depth=depth, batch=b, temp=int(temp)))
            print(json.dumps(rows[-1]), flush=True)
    arch = ARCHS[arch_name]
    for depth in depths:
        pts = [(r["batch"], r["temp"]) for r in rows if r["depth"] == depth]
        slope = np.polyfit(*zip(*pts), 1)[0]
        model = 4 * activation_floats(dataclasses.replace(arch, depth=depth), crop)
        print(f"depth {depth}: measured {slope / 2**20:.1f} MiB per image, model {model / 2**20:.1f} MiB "
              f"(measured / model = {slope / model:.2f})", flush=True)
    return rows


# Three points to compare totals at full depth (the fit needs the full grid).
QUICK_GRID = [("clp", 4, 1, 2, 1), ("clp", 4, 1, 4, 1), ("lgm", 4, 1, 2, 2)]


def measure(arch_name: str, depth: int, crop: int, syn_res: int, grid=MEASURE_GRID) -> dict:
    """Compiles the grid, fits peak = alpha + beta b + beta_r b_r + gamma M per method, compares with the model."""
    backbone, count = abstract_backbone(arch_name, depth, crop)
    arch = dataclasses.replace(ARCHS[arch_name], depth=depth, params=count)
    points = []
    for method, classes, ipc, copies, rpc in grid:
        m = compiled_bytes(backbone, method=method, num_classes=classes, ipc=ipc, copies=copies,
                           real_per_class=rpc, syn_res=syn_res, crop=crop, cache_rows=8 * classes)
        b, r, imgs = copies * classes * ipc, (rpc * classes if method == "lgm" else 0), classes * ipc
        model = step_bytes(arch, method=method, num_classes=classes, ipc=ipc, copies=copies, devices=1,
                           real_per_class=rpc, syn_res=syn_res, crop=crop, cache_rows=8 * classes)
        points.append(dict(method=method, classes=classes, ipc=ipc, copies=copies, real_per_class=rpc, b=b,
                           b_r=r, M=imgs, measured=m["peak"], modelled=model["total"], compile_s=m["compile_s"],
                           temp=m["temp_size_in_bytes"], args=m["argument_size_in_bytes"]))
        print(json.dumps(points[-1]), flush=True)
        print(f"  {method} classes={classes} copies={copies} real/class={rpc}: measured {m['peak'] / GiB:.3f} GiB, "
              f"model {model['total'] / GiB:.3f} GiB (ratio {m['peak'] / model['total']:.2f})", flush=True)
    return {"arch": dataclasses.asdict(arch), "crop": crop, "syn_res": syn_res, "points": points,
            "fit": fit(points)}


def fit(points: list[dict]) -> dict:
    """Least-squares coefficients (bytes per unit) of the measured and of the modelled peaks."""
    out = {}
    for method in ("clp", "lgm"):
        pts = [p for p in points if p["method"] == method]
        if len(pts) < 3:
            continue
        cols = ["b", "M"] + (["b_r"] if method == "lgm" else [])
        x = np.array([[1.0] + [p[c] for c in cols] for p in pts])
        res = {}
        for what in ("measured", "modelled"):
            y = np.array([p[what] for p in pts], float)
            coef, *_ = np.linalg.lstsq(x, y, rcond=None)
            res[what] = dict(zip(["alpha"] + cols, coef.round().tolist()))
        out[method] = res
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="print the modelled per-device memory table")
    t.add_argument("--arch", default="B/14", choices=sorted(ARCHS))
    t.add_argument("--classes", type=int, default=1000)
    t.add_argument("--ipc", default="1,10")
    t.add_argument("--copies", default="1,10")
    t.add_argument("--devices", default="8,64,256")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    t.add_argument("--cache_rows", type=int, default=1_281_167, help="CLP feature-cache rows (ImageNet-1K train)")
    mp = sub.add_parser("measure", help="compile jdd's step on CPU for small sizes and fit")
    mp.add_argument("--arch", default="B/14", choices=["B/14", "S/14"])
    mp.add_argument("--depth", type=int, default=2, help="backbone depth of the step grid (compile time)")
    mp.add_argument("--crop", type=int, default=224)
    mp.add_argument("--syn_res", type=int, default=256)
    mp.add_argument("--out", default="", help="also write the points and fit as JSON here")
    mp.add_argument("--sweep_depths", default="1,2,12", help="depths of the backbone-only sweep ('' to skip)")
    mp.add_argument("--sweep_batches", default="8,16,32")
    mp.add_argument("--grid", default="full", choices=["full", "quick"],
                    help="full: 9 points and the fit; quick: 3 points (e.g. with --depth 12)")
    a = ap.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",")]
    if a.cmd == "table":
        devices = ints(a.devices)
        print_table(table(ARCHS[a.arch], num_classes=a.classes, ipcs=ints(a.ipc), copies_list=ints(a.copies),
                          devices_list=devices, dtype=a.dtype, cache_rows=a.cache_rows), devices)
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    accelerator_attention()
    sweep = backbone_sweep(a.arch, ints(a.sweep_depths), ints(a.sweep_batches), a.crop) if a.sweep_depths else []
    result = measure(a.arch, a.depth, a.crop, a.syn_res, MEASURE_GRID if a.grid == "full" else QUICK_GRID)
    result["backbone_sweep"] = sweep
    print(json.dumps(result["fit"], indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
