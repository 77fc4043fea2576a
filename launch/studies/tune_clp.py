"""Grid search of CLP's ridge / temperature / label centring / bias on cached real features.

Optimises synthetic FEATURES directly (no images, no backbone) with the `clp` loss (Adam), then
trains a probe on the synthetic features and reports its accuracy on held-out real features.
Optimising features directly is an upper bound on what images can reach, but the ranking of the
hyper-parameters is informative and cheap to get.

    python launch/studies/tune_clp.py --feats_dir .cache/feats_imagenette_112 \
        [--ridges 0.1,0.3,1,3,10] [--temperatures 0.05,0.1,0.2,0.4,0.8] [--fit_bias 1,0] [--ipc 1]

Inputs: four .npy files (train_feats [N, D] float, train_labels [N] int, val_feats, val_labels),
named by --feats_dir (train_feats.npy, ...) or given one by one; or, to stay on the train split, a
jdd feature cache of it (--cache DIR, e.g. a run's ``feature_cache/imagefolder_train_...``) split with
--holdout 0.2 --holdout_seed 0: the slice that ``eval.track_holdout=0.2`` holds out of a seed-0 run
is scored, the rest is fitted. Prints a markdown table and writes
it as JSON with --out. Columns (mean ± std over --seeds distillation seeds, val top-1 %):
  probe: the project's evaluation probe (jdd.probe, LGM protocol, features mode: Adam at
         1e-3 * batch / 256, 1000 epochs, cosine, W ~ N(0, 0.01^2)), --probe_seeds heads per set;
  ridge: a closed-form ridge probe (ridge 1e-2, unpenalised bias) on the synthetic features, which
         shows how well the set encodes CLP's own inner solution.

--calibration prints, for each of --ridges, the temperature at which the class-centroid start is
calibrated: CLP's ridge probe fitted on the feature of each class's centroid image (the real image
nearest its class mean, what ``syn.init=centroid`` starts from), its relative logits scored on the
fitted real features, and the T that minimises their cross-entropy (log grid 1e-3..1e2). A property
of the data and the ridge, compared with the best T in docs/panel.md#clps-temperature-from-the-data.
"""
from __future__ import annotations

import argparse
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jdd import probe, selection
from jdd.data import FeatureCache
from jdd.methods import clp, linear

# Secondary evaluation: closed-form ridge probe with an unpenalised bias.
EVAL_RIDGE = 1e-2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--feats_dir", type=pathlib.Path, help="dir with {train,val}_{feats,labels}.npy")
    source.add_argument("--cache", type=pathlib.Path, help="a jdd feature cache of the train split (view 0 is read)")
    p.add_argument("--holdout", type=float, default=0.2, help="with --cache: the scored fraction of each class")
    p.add_argument("--holdout_seed", type=int, default=0, help="with --cache: the seed of the held-out slice")
    for split in ("train", "val"):
        for part in ("feats", "labels"):
            p.add_argument(f"--{split}_{part}", type=pathlib.Path)
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    bools = lambda s: [x.strip().lower() in ("1", "true", "yes") for x in s.split(",")]  # noqa: E731
    p.add_argument("--ridges", type=floats, default=[0.1, 0.3, 1.0, 3.0, 10.0])
    p.add_argument("--temperatures", type=floats, default=[0.05, 0.1, 0.2, 0.4, 0.8],
                   help="clp temperatures (relative: logits * (1 + ridge) / T)")
    p.add_argument("--center_labels", type=bools, default=[True])
    p.add_argument("--fit_bias", type=bools, default=[False, True])
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--steps", type=int, default=300, help="Adam steps on the synthetic features")
    p.add_argument("--lr", type=float, default=0.05,
                   help="Adam lr in units of the real features' per-coordinate RMS")
    p.add_argument("--real_batch", type=int, default=0,
                   help="real features per step (0: ipc * 10 * num_classes, LGM's batch)")
    p.add_argument("--seeds", type=int, default=3, help="distillation seeds (initialisations)")
    p.add_argument("--probe_seeds", type=int, default=2, help="evaluation heads per synthetic set")
    p.add_argument("--probe_epochs", type=int, default=1000)
    p.add_argument("--out", type=pathlib.Path, help="write the results as JSON here")
    p.add_argument("--calibration", action="store_true",
                   help="print the class-centroid start's calibrated temperature for each ridge, then exit")
    return p.parse_args(argv)


def load(args):
    """(train_z, train_y, val_z, val_y) as float32 / int32 numpy arrays, checked for consistency."""
    if args.cache:
        cache = FeatureCache.open(str(args.cache))
        fit, held = selection.held_out_split(cache.labels, args.holdout, args.holdout_seed)
        z, y = np.asarray(cache.view(0), np.float32), np.asarray(cache.labels, np.int32)
        return z[fit], y[fit], z[held], y[held]
    paths = {}
    for split, part in itertools.product(("train", "val"), ("feats", "labels")):
        path = getattr(args, f"{split}_{part}") or (
            args.feats_dir / f"{split}_{part}.npy" if args.feats_dir else None)
        if path is None or not path.exists():
            raise SystemExit(f"missing {split}_{part}: pass --feats_dir DIR holding {split}_{part}.npy "
                             f"or --{split}_{part} FILE (got {path})")
        paths[split, part] = path
    tz, ty, vz, vy = (np.load(paths[k]) for k in itertools.product(("train", "val"), ("feats", "labels")))
    if tz.ndim != 2 or vz.shape[1:] != tz.shape[1:] or ty.shape != (len(tz),) or vy.shape != (len(vz),):
        raise SystemExit(f"inconsistent shapes: train {tz.shape}/{ty.shape}, val {vz.shape}/{vy.shape}")
    return tz.astype(np.float32), ty.astype(np.int32), vz.astype(np.float32), vy.astype(np.int32)


def init_syn(key, train_y, num_classes: int, ipc: int):
    """Indices of `ipc` random training examples of each class, [C * ipc] (class-major)."""
    keys = jax.random.split(key, num_classes)
    idx = []
    for c in range(num_classes):
        members = np.flatnonzero(train_y == c)
        if len(members) < ipc:
            raise SystemExit(f"class {c} has {len(members)} training features, fewer than ipc={ipc}")
        idx.append(members[np.asarray(jax.random.permutation(keys[c], len(members)))[:ipc]])
    return np.concatenate(idx)


def distill(cfg, train_z, train_y, syn_y, init_z, *, steps, lr, real_batch, key):
    """Adam on the synthetic features [M, D] for `steps` steps of the clp loss; returns them."""
    opt = optax.adam(lr)
    train_z, train_y = jnp.asarray(train_z), jnp.asarray(train_y)

    def step(carry, k):
        z, state = carry
        k_real, k_loss = jax.random.split(k)
        idx = jax.random.choice(k_real, train_z.shape[0], (real_batch,), replace=False)
        real = {"feats": train_z[idx], "labels": train_y[idx]}
        value, grads = jax.value_and_grad(
            lambda z_: clp.loss({}, {}, k_loss, {"feats": z_, "labels": syn_y}, real, cfg)[0])(z)
        updates, state = opt.update(grads, state, z)
        return (optax.apply_updates(z, updates), state), value

    (z, _), losses = jax.lax.scan(step, (init_z, opt.init(init_z)), jax.random.split(key, steps))
    return z, losses


@jax.jit
def ridge_accuracy(syn_z, syn_y, val_z, val_y):
    """Val accuracy of the closed-form ridge probe fitted on (syn_z [M, D], syn_y [M, C])."""
    fit = linear.ridge_probe(syn_z, syn_y, EVAL_RIDGE, fit_bias=True)
    return linear.accuracy(linear.logits(fit, val_z), val_y)


def evaluate(sets, syn_y, val_z, val_y, probe_cfg):
    """[2, S] val accuracies (project probe averaged over its heads, ridge probe) of S synthetic
    feature sets [S, M, D] labelled syn_y [M, C]."""
    num_classes = syn_y.shape[1]
    out = []
    for z in sets:
        heads = probe.train_linear(jax.random.PRNGKey(1), z, np.asarray(syn_y), num_classes=num_classes,
                                   cfg=probe_cfg)
        out.append((float(jnp.mean(probe.accuracy(heads, val_z, val_y))),
                    float(ridge_accuracy(z, syn_y, val_z, val_y))))
    return np.asarray(out).T


def calibrated_temperature(train_z, train_y, num_classes: int, cfg, grid: int = 1001) -> float:
    """The T (on CLP's relative scale) minimising the outer cross-entropy of CLP's ridge probe (``cfg``'s
    ridge, centring and bias) fitted on each class's centroid feature, scored on all of ``train_z``.
    The CE is convex in 1 / T, so the grid's minimum (1e-3..1e2, log-spaced) is the one minimum."""
    idx = selection.centroid_indices(train_z, train_y, num_classes, 1)
    onehot = jax.nn.one_hot(np.arange(num_classes), num_classes)
    fit = linear.ridge_probe(jnp.asarray(train_z[idx]), linear.regression_targets(onehot, cfg.center_labels),
                             cfg.ridge, form=cfg.form, fit_bias=cfg.fit_bias)
    rel = linear.logits(fit, jnp.asarray(train_z)) * (1.0 + cfg.ridge)
    targets = jax.nn.one_hot(np.asarray(train_y), num_classes)
    temps = np.logspace(-3, 2, grid)
    ces = jax.lax.map(lambda t: linear.softmax_ce(rel / t, targets), jnp.asarray(temps, jnp.float32))
    return float(temps[int(jnp.argmin(ces))])


def main(argv=None):
    args = parse_args(argv)
    train_z, train_y, val_z, val_y = load(args)
    num_classes = int(train_y.max()) + 1
    if args.calibration:
        for ridge in args.ridges:
            cfg = ml_collections.ConfigDict(dict(clp.default_config(), ridge=ridge))
            print(f"ridge={ridge:g}: the centroid start is calibrated at T = "
                  f"{calibrated_temperature(train_z, train_y, num_classes, cfg):.3f} "
                  f"({len(train_z)} fitted train features, {num_classes} classes)")
        return
    real_batch = args.real_batch or min(args.ipc * 10 * num_classes, len(train_z))
    lr = args.lr * float(np.sqrt(np.mean(train_z ** 2)))
    syn_y = jax.nn.one_hot(np.repeat(np.arange(num_classes), args.ipc), num_classes)
    seeds = jax.random.split(jax.random.PRNGKey(0), args.seeds)
    inits = jnp.stack([train_z[init_syn(k, train_y, num_classes, args.ipc)] for k in seeds])
    probe_cfg = probe.probe_config()
    probe_cfg.mode, probe_cfg.seeds, probe_cfg.epochs = "features", args.probe_seeds, args.probe_epochs
    val_z, val_y = jnp.asarray(val_z), jnp.asarray(val_y)
    print(f"train {train_z.shape}, val {val_z.shape}, C={num_classes}, ipc={args.ipc}, "
          f"steps={args.steps}, real batch={real_batch}, Adam lr={lr:.4g}")

    rows = []

    def report(name, accs):
        accs = np.asarray(accs) * 100
        row = {"config": name, "probe": float(accs[0].mean()), "probe_std": float(accs[0].std()),
               "ridge": float(accs[1].mean()), "ridge_std": float(accs[1].std())}
        rows.append(row)
        print(f"| {name:44s} | {row['probe']:5.1f} ± {row['probe_std']:4.1f} | "
              f"{row['ridge']:5.1f} ± {row['ridge_std']:4.1f} |", flush=True)

    print("| config                                       | probe acc %  | ridge acc %  |")
    print("|----------------------------------------------|--------------|--------------|")
    report("init: random real feature per class", evaluate(inits, syn_y, val_z, val_y, probe_cfg))
    means = np.stack([train_z[train_y == c].mean(0) for c in range(num_classes)])
    cy = jax.nn.one_hot(np.arange(num_classes), num_classes)
    report("class-mean features", evaluate(jnp.asarray(means)[None], cy, val_z, val_y, probe_cfg))
    full = evaluate(jnp.asarray(train_z)[None], jax.nn.one_hot(train_y, num_classes), val_z, val_y,
                    probe_cfg)
    report(f"all {len(train_z)} real train features", full)

    grid = itertools.product(args.ridges, args.temperatures, args.center_labels, args.fit_bias)
    for ridge, temp, center, bias in grid:
        cfg = ml_collections.ConfigDict(dict(clp.default_config(), ridge=ridge, temperature=temp,
                                             center_labels=center, fit_bias=bias))
        run = jax.jit(jax.vmap(lambda z0, k: distill(cfg, train_z, train_y, syn_y, z0, steps=args.steps,
                                                     lr=lr, real_batch=real_batch, key=k)))
        syn_z, _ = run(inits, seeds)
        accs = evaluate(syn_z, syn_y, val_z, val_y, probe_cfg)
        report(f"ridge={ridge:g} T={temp:g} center={int(center)} bias={int(bias)}", accs)

    best = max(rows[3:], key=lambda r: r["probe"], default=None)
    if best:
        print(f"best (probe): {best['config']}  {best['probe']:.1f}%")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
