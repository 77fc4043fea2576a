"""jdd's LGM against the official PyTorch code, step for step, on identical inputs: relative differences.

The official code is GeorgeCazenavette/linear-gradient-matching; it is not part of this project. Bring a
CPU-ready copy as launch/official_lgm.py says, then:

    nice -n 10 python launch/parity_lgm.py --official=/tmp/lgm_official --backbone=.cache/dinov2s \\
        --data=../shared/data/imagenette --json=parity_lgm.json

Both sides run the same DINOv2 checkpoint (the official side through ``transformers``' Dinov2Model, whose
normed class token is what their torch-hub ``dinov2_vits14`` returns; their ``models.get_model`` is not
called), in float32, at the setting of docs/fidelity.md: 10 classes, 1 image per class, a 128 px
pyramid (levels 1..128) growing every 25 steps, 112 px crops, 3 copies, 30 real images a step, Adam 2e-3.

Shared inputs: the pyramid levels (one draw, copied into both), the real batch (30 images at 128 px; from
``--data``, 3 per class, centre crops, or random pixels without it), and the random head (the official
side's ``get_fc`` returns it; jdd's per-step head draw, ``jdd.methods.linear.init_probe``, is replaced
by it). Random draws that cannot be shared are pinned: in the "step" section both sides augment with
their own ops at parameters that leave nothing to chance (flip p=1; the official crop at scale = ratio
= 1, a full-image 128 -> 112 bilinear resample; noise p=1, std 0, mean 0.5), so the whole chain still runs
on both sides. The "augmentation" section runs the official ``AugStandard`` under a torch seed, replays
its draws (flip: rand(B); crop: rand(B, 4); noise: rand(B), randn(B, 3, H, W), in that order) and feeds
them to jdd's crop (``augment.lgm_crop_params`` + ``augment.grid_resized_crop``; flip and the noise sum
are one line each here). The "distributions" section compares what cannot be shared: jdd's own random
draws against the official ones, as mean and std over 1000 draws. Two references put the Adam rows
in scale: the official step in float64 (both float32 sides against it) and the official step against
itself with its real batch reordered (float32 summation order alone).

Output JSON: {"step": {name: rel_diff}, "augmentation": {...}, "distributions": {name: {"official":
[mean, std], "jdd": [mean, std], "z": difference of the means in standard errors}}, "settings": {...}};
rel_diff = max|jdd - official| / max|official|.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import types

import numpy as np

import official_lgm  # launch/official_lgm.py

SETTINGS = dict(classes=10, ipc=1, syn_res=128, crop_res=112, copies=3, lr=2e-3, extent=25, adam_steps=10,
                draws=1000)
# The pinned augmentation (module doc), as jdd augment options.
PINNED = dict(flip_p=1.0, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), noise_p=1.0, noise_std=0.0, noise_mean=0.5)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def nchw(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------------ official side

def official_modules(src: pathlib.Path) -> types.SimpleNamespace:
    """Their step's modules (``official_lgm.load_step``); their ``get_fc`` returns the shared head."""
    head = {}
    step = official_lgm.load_step(src, lambda linear: lambda num_feats, num_classes, distributed: head["fc"])
    import augmentation
    from augmentation import ops
    from synsets.pyramid import PyramidDataset
    return types.SimpleNamespace(LinearClassifier=step.linear.LinearClassifier, head=head, augmentation=augmentation,
                                 ops=ops, PyramidDataset=PyramidDataset, LinearGM=step.linear_gm.LinearGM)


class ClsToken:
    """The official backbone's output (torch-hub DINOv2: the normed class token) from the HF checkpoint."""

    def __init__(self, backbone_dir: str, float64: bool = False):
        from transformers import Dinov2Model
        self.model = Dinov2Model.from_pretrained(backbone_dir, attn_implementation="eager").eval()
        self.model.requires_grad_(False)
        self.directory = backbone_dir
        if float64:
            self.model.double()

    def __call__(self, x):
        return self.model(pixel_values=x).pooler_output


def official_gm(o, backbone, levels_nchw, real_nchw, head_w, pinned: bool, order=None, float64: bool = False):
    """Their LinearGM (without __init__, which builds data loaders) holding the shared inputs; ``order``
    permutes the real batch (the same images and labels, summed in another order); ``float64`` runs
    their step in double precision (the backbone passed must be double too)."""
    import torch
    s = SETTINGS
    cfg = types.SimpleNamespace(ipc=s["ipc"], lr=s["lr"], augs_per_batch=s["copies"], decorrelate_color=True,
                                init_mode="noise", pyramid_extent_it=s["extent"], pyramid_start_res=1,
                                syn_res=s["syn_res"], real_res=s["syn_res"], crop_res=s["crop_res"])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    train = types.SimpleNamespace(num_classes=s["classes"], normalize=lambda x: (x - mean) / std)
    g = o.LinearGM.__new__(o.LinearGM)
    g.cfg, g.train_dataset, g.distributed, g.backbone_model, g.num_feats = cfg, train, False, backbone, head_w.shape[0]
    ds = o.PyramidDataset(train_dataset=train, cfg=cfg)
    while len(ds.pyramid) < len(levels_nchw):
        ds.extend_pyramid()
    with torch.no_grad():  # theirs is finest first
        for p, v in zip(ds.pyramid, reversed(levels_nchw)):
            p.copy_(v)
    if float64:  # their tensors, as their code builds them, in double
        ds.pyramid = [p.detach().double().requires_grad_(True) for p in ds.pyramid]
        ds.color_correlation_svd_sqrt = ds.color_correlation_svd_sqrt.double()
        ds.max_norm_svd_sqrt = ds.max_norm_svd_sqrt.double()
        real_nchw = real_nchw.double()
    ds.optimizer = ds.init_optimizer()
    g.distilled_dataset = ds
    if pinned:
        chain = lambda: torch.nn.Sequential(  # noqa: E731
            o.ops.RandomHorizontalFlip(p=1.0), o.ops.RandomResizedCrop(size=s["crop_res"], scale=(1.0, 1.0),
                                                                       ratio=(1.0, 1.0)),
            o.ops.RandomGaussianNoise(mean=0.5, std=0.0, p=1.0))
        g.syn_augmentor, g.real_augmentor = chain(), chain()
    else:
        g.syn_augmentor = o.augmentation.get_augmentor(aug_mode="standard", crop_res=s["crop_res"])
        g.real_augmentor = o.augmentation.get_augmentor(aug_mode="standard", crop_res=s["crop_res"])
    labels = torch.arange(s["classes"]).repeat_interleave(s["ipc"] * s["copies"])
    if order is not None:
        real_nchw, labels = real_nchw[order], labels[order]
    g.train_iter = iter(lambda: (real_nchw, labels), None)  # the same real batch every step
    fc = o.LinearClassifier(dim=head_w.shape[0], num_labels=s["classes"]).eval()
    with torch.no_grad():
        fc.linear.weight.copy_(torch.from_numpy(head_w.T.copy()))  # theirs [C, D]
        fc.linear.bias.zero_()
    o.head["fc"] = fc.double() if float64 else fc
    return g


# ------------------------------------------------------------------------------------ jdd side

def jdd_parts(backbone_dir: str):
    """jdd's spec (the paper config at the parity setting, the pinned chain), method, backbone and mesh."""
    from jdd import config as jc, context, methods, parallel, step as step_lib
    s = SETTINGS
    c = jc.base_config()
    jc.lgm_paper(c)
    c.data.real_res, c.data.crop_res = s["syn_res"], s["crop_res"]
    c.syn.res, c.syn.ipc, c.syn.extent, c.syn.lr = s["syn_res"], s["ipc"], s["extent"], s["lr"]
    c.augment.copies = s["copies"]
    method = methods.get("lgm")
    spec = step_lib.make_spec(c, s["classes"], method)
    spec = dataclasses.replace(spec, aug_opts=tuple(sorted(dict(dict(spec.aug_opts), **PINNED).items())))
    backbone = context.load_backbone(backbone_dir)
    return types.SimpleNamespace(spec=spec, method=method, backbone=backbone, mesh=parallel.make_mesh(1),
                                 embed=context.embedder(backbone, "embedding"))


def share_head(head_w: np.ndarray):
    """Replaces jdd's per-step head draw by the shared head; returns the original draw function."""
    import jax.numpy as jnp

    from jdd.methods import linear
    original, w = linear.init_probe, jnp.asarray(head_w)
    linear.init_probe = lambda key, d, n, std: {"w": w, "b": jnp.zeros((n,), jnp.float32)}
    return original


def jdd_state(j, levels, step: int):
    """A state whose structure is that of ``step`` and whose levels are ``levels`` (coarse first)."""
    import jax
    import jax.numpy as jnp

    from jdd import parallel, step as step_lib
    state = step_lib.state_at(jax.random.PRNGKey(0), j.spec, step + 1, method=j.method,
                              feat_dim=j.backbone.embed_dim, init_images=None)
    assert [tuple(x.shape) for x in state["params"]["syn"]["levels"]] == [tuple(x.shape) for x in levels]
    params = dict(state["params"], syn={"levels": [jnp.asarray(x) for x in levels]})
    return parallel.replicate(dict(state, params=params, step=jnp.asarray(step, jnp.int32)), j.mesh)


# ------------------------------------------------------------------------------------ sections

def step_section(o, j, official_backbone, levels, real, head_w) -> dict:
    """Decoded images, match loss, per-level gradients, images after 1 and 10 Adam steps, growth."""
    import jax
    import jax.numpy as jnp

    from jdd import loop, parallel, step as step_lib, synsets
    s, out = SETTINGS, {}
    n_levels = len(levels)
    full_step = s["extent"] * (n_levels - 1) + 1  # the first step with every level
    g = official_gm(o, official_backbone, [nchw(x) for x in levels], nchw(real["image"]), head_w, pinned=True)
    state = jdd_state(j, levels, full_step)
    out["decoded_images"] = rel(synsets.decode("pyramid", state["params"]["syn"], res=s["syn_res"]),
                                nhwc(g.distilled_dataset.decode_pyramid()))
    # Loss and gradients at the shared start; the official call also takes its first Adam step.
    encode = parallel.batch_map(step_lib.encoder(j.embed.func, j.spec), j.mesh)
    loss_grad = jax.jit(step_lib.make_loss_and_grad(j.spec, j.method, encode))
    bb = parallel.replicate(j.backbone.params, j.mesh)
    real_dev = parallel.replicate(jax.tree.map(jnp.asarray, real), j.mesh)
    (loss, _), (grads, _) = loss_grad(state["params"], state["adv"], {}, bb, real_dev, jax.random.PRNGKey(1))
    official_loss = g.match_gradients()
    out["match_loss"] = abs(float(loss) - official_loss) / abs(official_loss)
    out["match_loss_values"] = {"jdd": float(loss), "official": official_loss}
    theirs = list(reversed(g.distilled_dataset.pyramid))
    for k, (ours, p) in enumerate(zip(grads["syn"]["levels"], theirs)):
        out[f"grad_level_{k}_{ours.shape[1]}px"] = rel(ours, nhwc(p.grad))
    # Adam alone: jdd's optimiser applied to the official gradient against the official first step.
    params_opt, _ = step_lib.make_optimizers(j.spec)
    their_grads = dict(jax.tree.map(jnp.zeros_like, state["params"]),
                       syn={"levels": [jnp.asarray(nhwc(p.grad)) for p in theirs]})
    updates, _ = params_opt.update(their_grads, params_opt.init(state["params"]), state["params"])
    their_updates = [nhwc(p) - x for p, x in zip(theirs, levels)]
    out["adam_update_from_the_same_gradient"] = max(
        rel(u, t) for u, t in zip(updates["syn"]["levels"], their_updates))
    # Adam's first step is about lr * sign(g) per entry: where fp32 rounding flips the sign of a
    # near-zero gradient entry, the two sides step in opposite directions. Count those entries and how
    # large their gradient is, relative to the level's largest.
    flips, worst = 0, 0.0
    for ours_g, p in zip(grads["syn"]["levels"], theirs):
        tg, og = nhwc(p.grad), np.asarray(ours_g)
        mask = np.sign(tg) != np.sign(og)
        flips += int(mask.sum())
        if mask.any():
            worst = max(worst, float(np.abs(tg[mask]).max() / np.abs(tg).max()))
    out["gradient_sign_flips"] = {"entries": flips, "of": int(sum(np.size(x) for x in levels)),
                                  "largest_flipped_over_level_max": worst}

    step = loop.jitted_step(j.spec, j.method, j.mesh, j.embed, donate=False)
    start = np.asarray(synsets.decode("pyramid", state["params"]["syn"], res=s["syn_res"]))
    official_images, jdd_images = {}, {}
    for n in range(1, s["adam_steps"] + 1):
        state, _ = step(state, {}, bb, real_dev)
        if n > 1:
            g.match_gradients()
        if n == 1:
            out["largest_level_difference_after_1_adam_step"] = adam_knee(
                state["params"]["syn"]["levels"], list(reversed(g.distilled_dataset.pyramid)), grads["syn"]["levels"])
        if n in (1, s["adam_steps"]):
            ours = jdd_images[n] = np.asarray(synsets.decode("pyramid", state["params"]["syn"], res=s["syn_res"]))
            theirs = official_images[n] = nhwc(g.distilled_dataset.decode_pyramid())
            out[f"images_after_{n}_adam_steps"] = rel(ours, theirs)
            out[f"image_change_after_{n}_adam_steps"] = rel(ours - start, theirs - start)
    # The float32 floor of those rows: the official code against itself, its real batch in reverse
    # order (the same images and labels; only the order of the loss's sums changes).
    g2 = official_gm(o, official_backbone, [nchw(x) for x in levels], nchw(real["image"]), head_w, pinned=True,
                     order=np.arange(len(real["label"]))[::-1].copy())
    for n in range(1, s["adam_steps"] + 1):
        g2.match_gradients()
        if n in (1, s["adam_steps"]):
            out[f"official_vs_itself_reordered_images_after_{n}_adam_steps"] = rel(
                nhwc(g2.distilled_dataset.decode_pyramid()), official_images[n])
    # Both float32 sides against the official step in float64 (the same inputs, double precision).
    g64 = official_gm(o, ClsToken(official_backbone.directory, float64=True), [nchw(x) for x in levels],
                      nchw(real["image"]), head_w, pinned=True, float64=True)
    for n in range(1, s["adam_steps"] + 1):
        g64.match_gradients()
        if n in (1, s["adam_steps"]):
            exact = nhwc(g64.distilled_dataset.decode_pyramid())
            out[f"official_float32_vs_float64_images_after_{n}_adam_steps"] = rel(official_images[n], exact)
            out[f"jdd_float32_vs_official_float64_images_after_{n}_adam_steps"] = rel(jdd_images[n], exact)
    print(json.dumps(out, indent=1), flush=True)

    # Growth: a pyramid one level short grows at the step it is due; old levels rescaled, Adam re-created.
    short = [np.asarray(x) for x in state["params"]["syn"]["levels"][:-1]]
    due = s["extent"] * (n_levels - 1) + 1
    g = official_gm(o, official_backbone, [nchw(x) for x in short], nchw(real["image"]), head_w, pinned=True)
    grown = step_lib.grow(jdd_state(j, short, due - 1), j.spec, due)
    g.distilled_dataset.extend_pyramid()
    theirs = list(reversed(g.distilled_dataset.pyramid))
    for k, (ours, p) in enumerate(zip(grown["params"]["syn"]["levels"][:-1], theirs[:-1])):
        out[f"grown_old_level_{k}"] = rel(ours, nhwc(p))
    out["adam_state_after_growth_max_abs"] = float(max(np.abs(np.asarray(x)).max()
                                                       for x in jax.tree.leaves(grown["opt"]["params"])))
    # The new level is a fresh draw on each side (compared in "distributions"); share theirs, take a step.
    levels_grown = [np.asarray(x) for x in grown["params"]["syn"]["levels"][:-1]] + [nhwc(theirs[-1])]
    state = jdd_state(j, levels_grown, due)
    before = np.asarray(synsets.decode("pyramid", state["params"]["syn"], res=s["syn_res"]))
    out["decoded_images_after_growth"] = rel(before, nhwc(g.distilled_dataset.decode_pyramid()))
    state, _ = step(state, {}, bb, real_dev)
    g.match_gradients()
    ours = np.asarray(synsets.decode("pyramid", state["params"]["syn"], res=s["syn_res"]))
    theirs_img = nhwc(g.distilled_dataset.decode_pyramid())
    out["images_after_growth_and_1_adam_step"] = rel(ours, theirs_img)
    out["image_change_after_growth_and_1_adam_step"] = rel(ours - before, theirs_img - before)
    return out


def adam_knee(ours_levels, their_levels, our_grads, eps: float = 1e-8) -> dict:
    """Where the two sides' levels differ most after one Adam step from the same start, and that entry's
    gradient. Adam's first update is lr * g / (|g| + eps): for |g| well below eps it is lr / eps * g, so
    a float32 rounding difference of the gradient there is multiplied by lr / eps (2e5 at lr 2e-3)."""
    best = None
    for k, (ours, p) in enumerate(zip(ours_levels, their_levels)):
        diff = np.abs(np.asarray(ours) - nhwc(p.detach()))
        i = np.unravel_index(int(diff.argmax()), diff.shape)
        if best is None or diff[i] > best["level_difference"]:
            tg, og = nhwc(p.grad)[i], np.asarray(our_grads[k])[i]
            best = {"level": k, "level_difference": float(diff[i]), "official_grad": float(tg), "jdd_grad": float(og),
                    "grad_over_eps": float(abs(tg) / eps), "level_max_grad": float(np.abs(nhwc(p.grad)).max())}
    return best


def official_draws(seed: int, batch: int, res: int):
    """The random numbers AugStandard draws under ``torch.manual_seed(seed)``, in its order."""
    import torch
    torch.manual_seed(seed)
    flip = torch.rand(batch) < 0.5
    u = torch.rand(batch, 4)
    apply = torch.rand(batch) < 0.5
    noise = torch.randn(batch, 3, res, res) if apply.any() else torch.zeros(batch, 3, res, res)
    return flip.numpy(), u.numpy(), apply.numpy(), nhwc(noise)


def augmentation_section(o, images) -> dict:
    """The official AugStandard against jdd's crop with the official draws replayed, and its gradient."""
    import jax
    import jax.numpy as jnp
    import torch

    from jdd import augment
    s = SETTINGS
    x = np.concatenate([images] * s["copies"])
    aug = o.augmentation.get_augmentor(aug_mode="standard", crop_res=s["crop_res"])
    xt = nchw(x).requires_grad_(True)
    torch.manual_seed(7)
    theirs = aug(xt)
    probe = np.random.default_rng(3).standard_normal(nhwc(theirs).shape).astype(np.float32)
    (theirs * nchw(probe)).sum().backward()
    flip, u, apply, noise = official_draws(7, len(x), s["crop_res"])

    def ours_fn(img):
        img = jnp.where(jnp.asarray(flip)[:, None, None, None], img[:, :, ::-1], img)
        crop = lambda i, uu: augment.grid_resized_crop(  # noqa: E731
            i, *augment.lgm_crop_params(uu), (s["crop_res"], s["crop_res"]))
        img = jax.vmap(crop)(img, jnp.asarray(u))
        return img + jnp.asarray(apply, jnp.float32)[:, None, None, None] * (0.5 + 0.2 * jnp.asarray(noise))
    ours, vjp = jax.vjp(ours_fn, jnp.asarray(x))
    return {"augmented_batch": rel(ours, nhwc(theirs)),
            "augmented_batch_image_gradient": rel(vjp(jnp.asarray(probe))[0], nhwc(xt.grad)),
            "flipped": int(flip.sum()), "noised": int(apply.sum()), "batch": len(x)}


def distributions_section(o, image, init_probe) -> dict:
    """What cannot be shared: each side's own draws, as mean and std over ``draws`` draws."""
    import jax
    import jax.numpy as jnp
    import torch

    from jdd import augment, synsets
    s, n = SETTINGS, SETTINGS["draws"]
    torch.manual_seed(11)
    aug = o.augmentation.get_augmentor(aug_mode="standard", crop_res=s["crop_res"])
    with torch.no_grad():
        theirs = nhwc(aug(nchw(np.repeat(image[None], n, 0))))
    ours = np.asarray(augment.augment(jax.random.PRNGKey(11), jnp.repeat(jnp.asarray(image)[None], n, 0),
                                      ops="flip,rrc_lgm,noise", out_res=s["crop_res"], noise_mean=0.5))

    def stats(batch):  # per draw: the mean, the pixel std, the left-right asymmetry, the zero-fill fraction
        half = s["crop_res"] // 2
        left, right = batch[:, :, :half].mean((1, 2, 3)), batch[:, :, half:].mean((1, 2, 3))
        return {"mean": batch.mean((1, 2, 3)), "pixel_std": batch.std((1, 2, 3)), "left_minus_right": left - right,
                "zero_fill": (batch == 0).mean((1, 2, 3))}
    out = {}
    plain = {"theirs": stats(theirs), "ours": stats(ours)}
    for key in plain["ours"]:
        out[f"augmented_{key}"] = {"official": [float(plain["theirs"][key].mean()), float(plain["theirs"][key].std())],
                                   "jdd": [float(plain["ours"][key].mean()), float(plain["ours"][key].std())]}
    # The new pyramid level at growth (randn / new_len) and the random head (N(0, 0.01^2)).
    o_ds = types.SimpleNamespace(pyramid=[torch.zeros(n, 3, 64, 64)] * 7, cfg=types.SimpleNamespace(syn_res=128,
                                 init_mode="noise", lr=1e-3), init_optimizer=lambda: None)
    o.PyramidDataset.extend_pyramid(o_ds)
    new_theirs = o_ds.pyramid[0].detach().numpy()
    params = {"levels": [jnp.zeros((n, r, r, 3)) for r in synsets.level_resolutions(128)[:7]]}
    grown, _ = synsets.grow("pyramid", params, step=7 * 25 + 1, res=128, extent=25, mode="lgm",
                            key=jax.random.PRNGKey(5))
    new_ours = np.asarray(grown["levels"][-1])
    std_theirs, std_ours = new_theirs.std((1, 2, 3)), new_ours.std((1, 2, 3))
    out["new_level_per_image_std"] = {"official": [float(std_theirs.mean()), float(std_theirs.std())],
                                      "jdd": [float(std_ours.mean()), float(std_ours.std())]}
    heads_theirs = np.stack([o.LinearClassifier(dim=384, num_labels=10).linear.weight.detach().numpy().std()
                             for _ in range(n)])
    keys = jax.random.split(jax.random.PRNGKey(9), n)
    heads_ours = np.asarray(jax.vmap(lambda k: jnp.std(init_probe(k, 384, 10, 0.01)["w"]))(keys))
    out["head_weight_std"] = {"official": [float(heads_theirs.mean()), float(heads_theirs.std())],
                              "jdd": [float(heads_ours.mean()), float(heads_ours.std())]}
    for row in out.values():  # the difference of the means in standard errors (|z| < 3: indistinguishable)
        (m1, s1), (m2, s2) = row["official"], row["jdd"]
        row["z"] = (m2 - m1) / max(np.sqrt((s1 ** 2 + s2 ** 2) / n), 1e-30)
    return out


def real_batch(data_dir: str) -> dict:
    """30 real images at 128 px, 3 per class (centre crops of --data's train split), or random pixels."""
    s = SETTINGS
    per_class = s["ipc"] * s["copies"]
    labels = np.repeat(np.arange(s["classes"]), per_class).astype(np.int32)
    if not data_dir:
        rng = np.random.default_rng(0)
        return {"image": rng.random((len(labels), s["syn_res"], s["syn_res"], 3), dtype=np.float32), "label": labels}
    from jdd import data
    source = data.load_source("imagefolder", "train", data_dir=data_dir)
    if source.num_classes != s["classes"]:
        raise SystemExit(f"--data={data_dir} has {source.num_classes} classes; the parity setting has {s['classes']}")
    idx = data.class_samples(source, per_class, seed=0).reshape(-1)
    return {"image": data.load_images(source, idx, real_res=s["syn_res"], crop_res=s["syn_res"]), "label": labels}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help="a CPU-ready copy of the official code (see --help)")
    ap.add_argument("--backbone", default=".cache/dinov2s", help="local DINOv2 checkpoint (Hugging Face format)")
    ap.add_argument("--data", default="", help="Imagenette ImageFolder root for the real batch ('' = random pixels)")
    ap.add_argument("--json", required=True, help="write the relative differences here")
    args = ap.parse_args()
    src = official_lgm.check_official(args.official)
    if not os.path.isfile(os.path.join(args.backbone, "config.json")):
        raise SystemExit(f"--backbone={args.backbone}: no Hugging Face checkpoint there (config.json missing)")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import torch
    torch.manual_seed(0)
    o = official_modules(src)
    s = SETTINGS
    rng = np.random.default_rng(0)
    sizes = [1]
    while sizes[-1] < s["syn_res"]:
        sizes.append(min(2 * sizes[-1], s["syn_res"]))
    levels = [(rng.standard_normal((s["classes"] * s["ipc"], r, r, 3)) / len(sizes)).astype(np.float32) for r in sizes]
    real = real_batch(args.data)
    j = jdd_parts(args.backbone)
    head_w = (0.01 * rng.standard_normal((j.backbone.embed_dim, s["classes"]))).astype(np.float32)
    init_probe = share_head(head_w)
    result = {"settings": dict(s, backbone=args.backbone, data=args.data or "random pixels", dtype="float32")}
    from jdd import synsets
    result["augmentation"] = augmentation_section(o, np.asarray(
        synsets.decode("pyramid", {"levels": levels}, res=s["syn_res"])))
    print(json.dumps(result["augmentation"], indent=1), flush=True)
    result["distributions"] = distributions_section(o, real["image"][0], init_probe)
    print(json.dumps(result["distributions"], indent=1), flush=True)
    result["step"] = step_section(o, j, ClsToken(args.backbone), levels, real, head_w)
    worst = max(v for k, v in result["step"].items()
                if isinstance(v, float) and k.startswith(("grad", "match", "decoded", "grown")))
    result["step_max_rel_diff"] = worst
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["step"], indent=1))
    print(f"worst rel diff of images, loss, gradients, grown levels {worst:.2e}; "
          f"augmented batch {result['augmentation']['augmented_batch']:.2e}")


if __name__ == "__main__":
    main()
