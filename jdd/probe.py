"""Linear-probe evaluation of a (distilled) image set on a frozen encoder.

The protocol is the one of the LGM paper's evaluation code (GeorgeCazenavette/linear-gradient-matching,
`src/distillation/eval.py` and `models.get_fc`):

- a fresh linear head, W ~ N(0, 0.01^2) and b = 0 (DINO's `LinearClassifier(dim, num_labels)`);
- Adam (0.9, 0.999, eps 1e-8), no weight decay, lr = 1e-3 * batch / 256 with batch = min(100, N),
  shuffled mini-batches, the last one of an epoch partial (PyTorch `DataLoader`, `drop_last=False`);
- cosine annealing to 0 over the epochs, stepped once per epoch (`CosineAnnealingLR(T_max=epochs)`);
- each epoch every image gets a horizontal flip and a random resized crop (scale 0.08-1) and goes through
  the frozen backbone; cross-entropy against hard labels or against soft label distributions;
- top-1 on the whole test split after the last epoch; mean and population std (`np.std`) over 5 seeds.
  (The original can also test every `eval_it` epochs and keep the best test top-1 with a patience; a
  fork's copy of its defaults, eval_it=-1, tests only after the last epoch, as here. The original runs
  under fp16 autocast; here everything is float32.)

Speed: the backbone is frozen, so the features of the augmented views do not depend on the probe. For a
chunk of epochs the features of all seeds x epochs x images are computed first, in micro-batches of
`embed_batch` views, and then `lax.scan` runs the Adam steps of that chunk on them; chunks are a
`lax.scan` too, so one evaluation is one compiled program with no host sync. The chunk length is the
largest divisor of `epochs` whose features fit in `chunk_budget_mb`. Seeds are `vmap`ped.

Progress (`cfg.progress`, off by default): the compiled program reports to the host with
`jax.debug.callback` after each micro-batch of views it embeds (full and bank modes: that is where the
time goes; a 1000-epoch run on a few images is often a single chunk) or after each chunk (features
mode), and the host prints the fraction done, the elapsed time and an ETA (a tqdm bar, or log lines).
The callbacks only read values, so results are bit-identical with and without progress
(tests/test_progress.py); the program stays one compilation, which takes a run id as an argument to find
its reporter. Full and bank modes report even when silent: a report is where a program whose caller
has gone (a signal, Ctrl-C) ends, instead of running its minutes to the end (`jdd.signals.call`).

Randomness is derived: seed s -> `fold_in(key, s)` -> (init key, run key); epoch e -> `fold_in(run key, e)`
-> (permutation key, augmentation key); image i of that epoch -> `fold_in(augmentation key, i)`. A view's
key therefore does not depend on chunking or batching, so chunked and per-step training see the same views
and batches (equal up to float rounding; tests/test_probe.py checks against a per-step PyTorch loop).

Functions passed in (`embed_fn`, `augment_fn`) should be `jax.tree_util.Partial`s when they carry arrays
(e.g. `embedder(bb.apply, params)`): their arrays are then traced arguments of the compiled program rather
than constants baked into it, and repeated evaluations with the same functions reuse one compilation.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.tree_util import Partial

from jdd import progress as progress_lib
from jdd import signals
from jdd.methods import linear

PROTOCOL_FULL = "LGM linear probe (augmented views through the frozen backbone)"
PROTOCOL_FEATURES = "features-only (fast)"
PROTOCOL_BANK = "view bank K={k}: LGM linear probe, each epoch one of K augmented views per image encoded once"
MODES = ("full", "features", "bank")
BANK_TAG = 0x62616E6B  # folded into the protocol key for the view bank's keys (disjoint from seed ids)
PROGRESS = progress_lib.MODES  # "" (silent), "bar" (tqdm) or "log" (INFO lines on the "jdd" logger)


def probe_config() -> ml_collections.ConfigDict:
    """Default (LGM) probe settings, locked: unknown keys are an error."""
    c = ml_collections.ConfigDict()
    c.mode = "full"              # "full": augmented views each epoch; "features": one fixed feature per image;
                                 # "bank": K augmented views per image encoded once, one drawn per epoch
    c.bank_views = 16            # bank: K
    c.epochs = 1000
    c.seeds = 5
    c.lr_base = 1e-3             # lr = lr_base * batch / lr_batch_ref (linear scaling rule)
    c.lr_batch_ref = 256
    c.batch_max = 100            # batch = min(batch_max, N)
    c.init_std = 0.01            # W ~ N(0, init_std^2), b = 0; 0.0 gives a zero init
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.flip = True
    c.rrc = True
    c.rrc_scale = (0.08, 1.0)
    c.rrc_ratio = (3 / 4, 4 / 3)
    c.out_res = ml_collections.config_dict.placeholder(int)  # crop output size; None keeps the input size
    c.chunk_budget_mb = 1024     # memory for the augmented features of one chunk of epochs (all seeds)
    c.chunk_epochs = 0           # 0: chosen from chunk_budget_mb; else must divide epochs
    c.embed_batch = 256          # views per backbone call
    c.eval_batch = 8192          # test features per accuracy batch
    c.progress = ""              # "": silent; "bar": tqdm bar; "log": log lines (fraction done, elapsed, ETA)
    c.lock()
    return c


class Hyper(NamedTuple):
    """The static (hashable) numbers one compiled probe run depends on."""
    epochs: int
    batch: int
    steps: int                   # steps per epoch = ceil(N / batch)
    lr0: float
    init_std: float
    b1: float
    b2: float
    eps: float
    chunk_epochs: int
    embed_batch: int


# ----------------------------------------------------------------------------------------- randomness

def seed_keys(key, seed_id):
    """(init key, run key) of seed `seed_id`."""
    k = jax.random.split(jax.random.fold_in(key, seed_id))
    return k[0], k[1]


def epoch_keys(run_key, epoch):
    """(permutation key, augmentation key) of one epoch of one seed."""
    k = jax.random.split(jax.random.fold_in(run_key, epoch))
    return k[0], k[1]


def view_keys(aug_key, n: int):
    """[n, 2] keys, one per image, for the augmented views of one epoch."""
    return jax.vmap(lambda i: jax.random.fold_in(aug_key, i))(jnp.arange(n))


def lr_schedule(hp: Hyper):
    """[epochs] learning rate of each epoch: cosine from lr0 to 0, stepped per epoch."""
    e = jnp.arange(hp.epochs, dtype=jnp.float32)
    return hp.lr0 * 0.5 * (1.0 + jnp.cos(jnp.pi * e / hp.epochs))


# ----------------------------------------------------------------------------------------- training core

def _loss(params, x, y, mask):
    """Mean over valid rows of the cross-entropy of softmax(x W + b) against distributions y [B, C]."""
    return linear.softmax_ce(linear.logits(params, x), y, mask)


def _epoch(params, opt, feats, y, perm_key, lr, hp: Hyper):
    """One epoch for one seed: shuffled batches (last one partial, masked), one Adam step each."""
    n = y.shape[0]
    adam = optax.scale_by_adam(hp.b1, hp.b2, hp.eps)
    perm = jax.random.permutation(perm_key, n)
    idx = linear.pad_batches(perm, hp.batch)                       # [steps, batch]
    mask = linear.pad_batches(jnp.ones((n,)), hp.batch)

    def step(carry, xs):
        params, opt = carry
        i, m = xs
        grads = jax.grad(_loss)(params, feats[i], y[i], m)
        upd, opt = adam.update(grads, opt)
        return (jax.tree.map(lambda p, u: p - lr * u, params, upd), opt), None

    (params, opt), _ = jax.lax.scan(step, (params, opt), (idx, mask))
    return params, opt


def _micro_batches(views: int, embed_batch: int) -> tuple[int, int]:
    """(views per backbone call, number of calls) for `views` views: the split `_chunk_features` makes."""
    m = min(embed_batch, views)
    return m, -(-views // m)


def _chunk_features(source, vkeys, n: int, embed_batch: int, on_batch=None):
    """Features [P, T, N, D] of the views keyed by vkeys [P, T, N, 2], `embed_batch` views at a time.

    on_batch(j, feats [m, D]), when given, is traced after micro-batch j (progress reports).
    """
    lead = vkeys.shape[:-2]
    v = math.prod(lead) * n
    m, _ = _micro_batches(v, embed_batch)
    xs = (linear.pad_batches(vkeys.reshape(v, -1), m), linear.pad_batches((jnp.arange(v) % n).astype(jnp.int32), m))
    if on_batch is None:
        feats = jax.lax.map(lambda a: source(a[0], a[1]).astype(jnp.float32), xs)
    else:
        def body(a):
            f = source(a[0], a[1]).astype(jnp.float32)
            on_batch(a[2], f)
            return f
        feats = jax.lax.map(body, (*xs, jnp.arange(xs[1].shape[0])))
    return feats.reshape(-1, feats.shape[-1])[:v].reshape(*lead, n, feats.shape[-1])


# ----------------------------------------------------------------------------------------- progress

def _progress_units(hp: Hyper, num_seeds: int, n: int, full: bool) -> int:
    """How many reports a training makes: micro-batches of views over all chunks, or 1 (features)."""
    if not full:
        return 1
    _, batches = _micro_batches(num_seeds * hp.chunk_epochs * n, hp.embed_batch)
    return hp.epochs // hp.chunk_epochs * batches


@functools.partial(jax.jit, static_argnames=("hp", "progress"))
def train_program(key, seed_ids, source, y, hp: Hyper, run_id=0, progress: bool = False):
    n, c = y.shape
    full = callable(source)
    if full:
        d = jax.eval_shape(source, jnp.zeros((1, 2), jnp.uint32), jnp.zeros((1,), jnp.int32)).shape[-1]
    else:
        d = source.shape[-1]
    adam = optax.scale_by_adam(hp.b1, hp.b2, hp.eps)

    def init_one(sid):
        init_key, run_key = seed_keys(key, sid)
        params = linear.init_probe(init_key, d, c, hp.init_std)
        return params, adam.init(params), run_key

    params, opt, run_keys = jax.vmap(init_one)(seed_ids)
    lrs = lr_schedule(hp)
    t = hp.chunk_epochs if full else hp.epochs

    def run_chunk(carry, ci):
        epochs = ci * t + jnp.arange(t)
        both = jax.vmap(lambda rk: jax.vmap(lambda e: epoch_keys(rk, e))(epochs))(run_keys)
        perm_keys, aug_keys = both                                     # [P, T, 2] each
        lr_t = jax.lax.dynamic_slice(lrs, (ci * t,), (t,))
        if full:
            vkeys = jax.vmap(jax.vmap(lambda k: view_keys(k, n)))(aug_keys)
            on_batch = None
            if progress:
                _, nb = _micro_batches(math.prod(vkeys.shape[:2]) * n, hp.embed_batch)

                def on_batch(j, f):  # report after micro-batch j of chunk ci (waits for its features)
                    jax.debug.callback(progress_lib.report, run_id, ci * nb + j + 1, f[0, 0])
            feats = _chunk_features(source, vkeys, n, hp.embed_batch, on_batch)  # [P, T, N, D]
        else:
            feats = None

        def one_seed(params, opt, feats_s, perm_keys_s):
            def one_epoch(carry, xs):
                f, pk, lr = xs
                return _epoch(*carry, source if f is None else f, y, pk, lr, hp), None
            return jax.lax.scan(one_epoch, (params, opt), (feats_s, perm_keys_s, lr_t))[0]

        new = jax.vmap(one_seed)(*carry, feats, perm_keys)
        if progress and not full:
            jax.debug.callback(progress_lib.report, run_id, ci + 1, new[0]["b"][0, 0])
        return new, None

    (params, _), _ = jax.lax.scan(run_chunk, (params, opt), jnp.arange(hp.epochs // t))
    return params


def train_linear(key, feats_or_fn, labels, *, num_classes: int, cfg, seed_ids=None,
                 desc: str | None = None) -> dict:
    """Trains `len(seed_ids)` linear heads at once (vmap) with the probe protocol; returns their params.

    feats_or_fn: features [N, D] (features-only: the same feature of an image every epoch), or a
      function `(view_keys [M, 2], image_idx [M]) -> [M, D]` giving the features of the views of images
      `image_idx` augmented with `view_keys` (preferably a `jax.tree_util.Partial`, see module doc).
    labels: int [N] or probabilities [N, C].  seed_ids: ints (default range(cfg.seeds)).
    desc: the label of progress reports (cfg.progress). Returns {"w": [S, D, C], "b": [S, C]}.
    """
    shown = getattr(cfg, "progress", "")
    if shown not in PROGRESS:
        raise ValueError(f"probe progress {shown!r} is unknown; use one of {PROGRESS} ('' = silent)")
    y = _label_distributions(labels, num_classes)
    seed_ids = jnp.arange(cfg.seeds) if seed_ids is None else jnp.asarray(seed_ids, jnp.int32).reshape(-1)
    if callable(feats_or_fn):
        source = feats_or_fn if isinstance(feats_or_fn, Partial) else Partial(feats_or_fn)
        dim = jax.eval_shape(source, jnp.zeros((1, 2), jnp.uint32), jnp.zeros((1,), jnp.int32)).shape[-1]
    else:
        source = jnp.asarray(feats_or_fn, jnp.float32)
        if source.ndim != 2 or source.shape[0] != y.shape[0]:
            raise ValueError(f"features have shape {source.shape}, expected [N={y.shape[0]}, D]")
        dim = source.shape[1]
    full = callable(feats_or_fn)
    hp = make_hyper(cfg, y.shape[0], dim, len(seed_ids), full)
    if not shown and not full:  # features mode: one program of milliseconds (the tracker's), no reports
        return train_program(key, seed_ids, source, y, hp)
    desc = desc or f"probe ({'full' if full else 'features'})"
    units = _progress_units(hp, len(seed_ids), y.shape[0], full)
    with progress_lib.reporter(progress_lib.Progress(units, shown, desc, epochs=hp.epochs)) as run_id:
        # Waits for the result, so that every report has arrived before the reporter goes, with the
        # main thread free for a signal's handler (signals.call); if it raises, the program ends at
        # its next report.
        return signals.call(lambda: train_program(key, seed_ids, source, y, hp, jnp.int32(run_id), progress=True),
                            abandon=lambda: progress_lib.abandon(run_id))


def make_hyper(cfg, n: int, dim: int, num_seeds: int, full: bool) -> Hyper:
    """Static settings for N training images of D-dim features; validates cfg."""
    if cfg.epochs < 1 or cfg.seeds < 1 or cfg.batch_max < 1:
        raise ValueError(f"epochs, seeds and batch_max must be >= 1, got {cfg.epochs}, {cfg.seeds}, "
                         f"{cfg.batch_max}")
    batch = min(cfg.batch_max, n)
    t = cfg.epochs
    if full:
        per_epoch = num_seeds * n * dim * 4
        t_max = max(1, int(cfg.chunk_budget_mb * 2**20 // per_epoch))
        t = max(d for d in range(1, cfg.epochs + 1) if cfg.epochs % d == 0 and d <= t_max)
        if cfg.chunk_epochs:
            if cfg.epochs % cfg.chunk_epochs:
                raise ValueError(f"chunk_epochs={cfg.chunk_epochs} must divide epochs={cfg.epochs}; "
                                 "set it to a divisor or to 0 (automatic)")
            t = cfg.chunk_epochs
    return Hyper(epochs=cfg.epochs, batch=batch, steps=-(-n // batch),
                 lr0=cfg.lr_base * batch / cfg.lr_batch_ref, init_std=cfg.init_std, b1=cfg.adam_b1,
                 b2=cfg.adam_b2, eps=cfg.adam_eps, chunk_epochs=t, embed_batch=cfg.embed_batch)


def _label_distributions(labels, num_classes: int):
    """Hard int [N] labels -> one-hot [N, C]; soft [N, C] probabilities are checked and kept."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"1-D labels must be integers, got {labels.dtype}; soft labels are [N, C]")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
        return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if labels.ndim != 2 or labels.shape[1] != num_classes:
        raise ValueError(f"soft labels must be [N, num_classes={num_classes}], got {labels.shape}")
    if labels.min() < 0 or not np.allclose(labels.sum(1), 1.0, atol=1e-3):
        raise ValueError("soft labels must be probabilities (non-negative rows summing to 1); "
                         "apply jax.nn.softmax to logits first")
    return jnp.asarray(labels, jnp.float32)


# ----------------------------------------------------------------------------------------- evaluation

@functools.partial(jax.jit, static_argnames=("batch",))
def accuracy(params, feats, labels, batch: int = 8192):
    """Top-1 accuracy (fraction) of each head: params {"w": [S, D, C], "b": [S, C]} (or unbatched) -> [S]."""
    w, b = params["w"], params["b"]
    if w.ndim == 2:
        w, b = w[None], b[None]
    n = feats.shape[0]
    m = min(batch, n)

    def count(xs):
        fx, lx = xs
        return jnp.sum(linear.correct(jnp.einsum("nd,sdc->snc", fx, w) + b[:, None], lx[None]), axis=1)

    counts = jax.lax.map(count, (linear.pad_batches(feats.astype(jnp.float32), m),
                                 linear.pad_batches(labels.astype(jnp.int32), m, fill=-1)))
    return jnp.sum(counts, axis=0) / n


def augment_embed(augment_fn, embed_fn, images, keys, idx):
    """Features [M, D] of images[idx] augmented with keys [M, 2]."""
    x = jax.vmap(augment_fn)(keys, images[idx])
    return embed_fn(x)


@functools.partial(jax.jit, static_argnames=("batch",))
def embed_views(augment_fn: Callable, embed_fn: Callable, images, keys, *, batch: int) -> jax.Array:
    """Features [V * M, D] of V augmented views of images [M, H, W, 3], view-major (view v of image i
    is row v * M + i, augmented with keys[v * M + i]), ``batch`` views per backbone call."""
    idx = jnp.arange(keys.shape[0]) % images.shape[0]

    def one(args):
        k, i = args
        return embed_fn(augment_fn(k, images[i])[None])[0].astype(jnp.float32)
    return jax.lax.map(one, (keys, idx), batch_size=batch)


def view_bank(key, augment_fn, embed_fn, images, views: int, *, batch: int) -> jax.Array:
    """The bank mode's features [K, N, D]: K augmented views of each image, encoded once (view k of
    image i augmented with split(key, K * N)[k * N + i])."""
    n = images.shape[0]
    keys = jax.random.split(key, views * n)
    return embed_views(augment_fn, embed_fn, images, keys, batch=batch).reshape(views, n, -1)


def bank_draw(bank, keys, idx):
    """Features [M, D] of images ``idx`` [M]: for each, the bank view [K, N, D] its view key draws
    (uniform over K): the bank's stand-in for augmenting and encoding a fresh view."""
    k = jax.vmap(lambda key: jax.random.randint(key, (), 0, bank.shape[0]))(keys)
    return bank[k, idx]


def _augment_one(key, image, *, ops, out_res, rrc_scale, rrc_ratio):
    from jdd import augment  # imported lazily: probe.py only needs it for the full protocol
    return augment.augment(key, image[None], ops=ops, out_res=out_res, rrc_scale=rrc_scale,
                           rrc_ratio=rrc_ratio)[0]


@functools.lru_cache(maxsize=None)
def _default_augment(ops, out_res, rrc_scale, rrc_ratio):
    # cached so that equal settings give the same function object (one compilation)
    return Partial(functools.partial(_augment_one, ops=ops, out_res=out_res, rrc_scale=rrc_scale,
                                     rrc_ratio=rrc_ratio))


def default_augment_fn(cfg):
    """`(key, image [H, W, 3]) -> image` applying the configured flip / random resized crop (jdd.augment)."""
    ops = tuple(op for op, on in (("flip", cfg.flip), ("rrc", cfg.rrc)) if on)
    return _default_augment(ops, cfg.out_res, tuple(cfg.rrc_scale), tuple(cfg.rrc_ratio))


class _Feature:
    """images -> apply_fn(params, images)[feature]; equal when apply_fn and feature are (so jit reuses)."""

    def __init__(self, apply_fn, feature: str):
        self.apply_fn, self.feature = apply_fn, feature

    def __call__(self, params, images, token_keep=None):
        if token_keep is None:
            return self.apply_fn(params, images)[self.feature]
        return self.apply_fn(params, images, token_keep=token_keep)[self.feature]

    def __eq__(self, other):
        return isinstance(other, _Feature) and (other.apply_fn, other.feature) == (self.apply_fn, self.feature)

    def __hash__(self):
        return hash((self.apply_fn, self.feature))


def embedder(apply_fn, params, feature: str = "embedding"):
    """embed_fn for a backbone: images -> apply_fn(params, images)[feature], params traced (a Partial)."""
    return Partial(_Feature(apply_fn, feature), params)


def protocol(cfg, hp: Hyper, labels, *, mode: str, augment: bool) -> dict:
    """The settings a result was obtained with, for results files."""
    ops = [op for op, on in (("flip", cfg.flip), ("rrc", cfg.rrc)) if on] if augment else []
    names = {"full": PROTOCOL_FULL, "features": PROTOCOL_FEATURES, "bank": PROTOCOL_BANK.format(k=cfg.bank_views)}
    return {
        "name": names[mode], "mode": mode, **({"bank_views": cfg.bank_views} if mode == "bank" else {}),
        "epochs": hp.epochs, "seeds": cfg.seeds, "batch": hp.batch,
        "steps_per_epoch": hp.steps, "lr": hp.lr0,
        "lr_rule": f"{cfg.lr_base} * batch / {cfg.lr_batch_ref}, cosine to 0 stepped per epoch",
        "optimizer": f"Adam({hp.b1}, {hp.b2}, eps={hp.eps}), no weight decay",
        "init": f"W ~ N(0, {hp.init_std}^2), b = 0",
        "augment": ops, "rrc_scale": list(cfg.rrc_scale) if "rrc" in ops else None,
        "rrc_ratio": list(cfg.rrc_ratio) if "rrc" in ops else None, "out_res": cfg.out_res,
        "labels": "soft" if np.ndim(labels) == 2 else "hard",
        "chunk_epochs": hp.chunk_epochs if mode != "features" else None,
        "std": "population std (ddof=0) over seeds", "metric": "top-1 (%) on the whole test split, last epoch",
    }


def result_record(top1, proto, t0, meta) -> dict:
    # float32 fractions -> percent, rounded below the resolution of any test split (1e-4 %)
    top1 = np.round(100.0 * np.asarray(jax.device_get(top1), np.float64), 4)
    out = {"top1_mean": float(top1.mean()), "top1_std": float(top1.std()),
           "top1_per_seed": [float(v) for v in top1], "protocol": proto,
           "wall_time_s": time.perf_counter() - t0}
    out.update(meta or {})
    return out


def check_test(test_feats, test_labels, dim, num_classes):
    if test_feats.ndim != 2 or test_feats.shape[1] != dim:
        raise ValueError(f"test features have shape {tuple(test_feats.shape)}, expected [M, {dim}] "
                         "(the backbone's embedding size)")
    if np.ndim(test_labels) != 1 or len(test_labels) != test_feats.shape[0]:
        raise ValueError(f"test labels must be int [M={test_feats.shape[0]}], got {np.shape(test_labels)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")


def evaluate_features(key, feats, labels, test_feats, test_labels, *, num_classes: int, cfg,
                      meta: dict | None = None, desc: str | None = None) -> dict:
    """Fast mode: probe trained on one fixed feature per image (no augmentation), labelled as such.

    feats [N, D]; labels int [N] or probabilities [N, C]; test_feats [M, D]; test_labels int [M].
    desc labels the progress reports (cfg.progress).
    """
    t0 = time.perf_counter()
    feats = jnp.asarray(feats, jnp.float32)
    check_test(test_feats, test_labels, feats.shape[-1], num_classes)
    params = train_linear(key, feats, labels, num_classes=num_classes, cfg=cfg, desc=desc)
    top1 = accuracy(params, jnp.asarray(test_feats), jnp.asarray(test_labels), batch=cfg.eval_batch)
    hp = make_hyper(cfg, feats.shape[0], feats.shape[1], cfg.seeds, full=False)
    return result_record(top1, protocol(cfg, hp, labels, mode="features", augment=False), t0, meta)


@functools.partial(jax.jit, static_argnames=("batch",))
def embed_images(embed_fn, images, batch: int = 256):
    """Features [N, D] of un-augmented images [N, H, W, 3], `batch` at a time."""
    n = images.shape[0]
    m = min(batch, n)
    f = jax.lax.map(lambda b: embed_fn(b).astype(jnp.float32), linear.pad_batches(images, m))
    return f.reshape(-1, f.shape[-1])[:n]


def evaluate(key, images, labels, embed_fn: Callable, test_feats, test_labels, *, num_classes: int, cfg,
             augment_fn: Callable | None = None, meta: dict | None = None, desc: str | None = None) -> dict:
    """Probe protocol on an image set; returns top1_mean/top1_std (%), top1_per_seed, protocol, wall_time_s.

    images [N, H, W, 3] in [0, 1]; labels int [N] or probabilities [N, C]; embed_fn: images [B, H', W', 3]
    -> [B, D] (frozen backbone, preferably `embedder(...)`); test_feats [M, D] from the same backbone with
    eval preprocessing; test_labels int [M]. augment_fn `(key, image) -> image` defaults to
    `default_augment_fn(cfg)`. cfg.mode == "features" embeds each image once and trains on those features;
    "bank" embeds cfg.bank_views augmented views of each image once and trains as "full" does, each
    epoch drawing one of them per image (the bank's key is ``fold_in(key, BANK_TAG)``).
    desc labels the progress reports (cfg.progress: "" silent, "bar", "log").
    """
    if cfg.mode not in MODES:
        raise ValueError(f"probe mode {cfg.mode!r} is unknown; use one of {MODES}")
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] in [0, 1], got shape {tuple(images.shape)}")
    if np.shape(labels)[0] != images.shape[0]:
        raise ValueError(f"{np.shape(labels)[0]} labels for {images.shape[0]} images")
    embed_fn = embed_fn if isinstance(embed_fn, Partial) else Partial(embed_fn)
    if cfg.mode != "features":
        augment_fn = default_augment_fn(cfg) if augment_fn is None else augment_fn
        augment_fn = augment_fn if isinstance(augment_fn, Partial) else Partial(augment_fn)
    # The backbone sees what the protocol feeds it: augmented views (cropped to out_res) outside
    # features mode, so a set stored at a size the backbone cannot read (e.g. LGM's 256 px for a
    # patch-14 ViT) is checked at the size of its views.
    out = jax.eval_shape(embed_fn, images[:1]) if cfg.mode == "features" else jax.eval_shape(
        lambda k, x: embed_fn(augment_fn(k, x)[None]), jax.random.PRNGKey(0), images[0])
    if len(out.shape) != 2:
        raise ValueError(f"embed_fn must return [B, D] features, got shape {out.shape}")
    check_test(test_feats, test_labels, out.shape[1], num_classes)
    if cfg.mode == "features":
        t0 = time.perf_counter()
        feats = embed_images(embed_fn, images, batch=cfg.embed_batch)
        res = evaluate_features(key, feats, labels, test_feats, test_labels, num_classes=num_classes,
                                cfg=cfg, meta=meta, desc=desc)
        res["wall_time_s"] = time.perf_counter() - t0
        return res
    t0 = time.perf_counter()
    if cfg.mode == "bank":
        if cfg.bank_views < 1:
            raise ValueError(f"bank_views must be >= 1, got {cfg.bank_views}")
        bank = view_bank(jax.random.fold_in(key, BANK_TAG), augment_fn, embed_fn, images, cfg.bank_views,
                         batch=cfg.embed_batch)
        source = Partial(bank_draw, bank)
    else:
        source = Partial(augment_embed, augment_fn, embed_fn, images)
    params = train_linear(key, source, labels, num_classes=num_classes, cfg=cfg, desc=desc)
    top1 = accuracy(params, jnp.asarray(test_feats), jnp.asarray(test_labels), batch=cfg.eval_batch)
    hp = make_hyper(cfg, images.shape[0], out.shape[1], cfg.seeds, full=True)
    return result_record(top1, protocol(cfg, hp, labels, mode=cfg.mode, augment=True), t0, meta)

