"""The distillation state and the pure update step.

State (a plain pytree; what the checkpoint holds)::

    {"step": int32[],
     "params": {"syn": synset params, "labels": [M, C] soft-label logits (or {}), "method": method's "min" params},
     "adv": method's "max" params (maximised against the images, e.g. NCFM's frequency sampler),
     "opt": {"params": optax state, "adv": optax state},
     "rng": the run's base key (uint32[2]); the key of step k is fold_in(rng, k), never advanced in place}

The frozen backbone parameters, the method's constants (e.g. MTT expert trajectories) and the
cached real features are arguments of the step, never part of the state.

One step, in the global view (the device split happens only inside ``parallel.batch_map``):
decode the synthetic images -> ``copies`` augmented copies -> backbone features; real features from
the augmented real batch (or sampled from the feature cache, inside the step); the method's loss;
Adam descent on ``params`` and ascent on ``adv``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jdd import augment, synsets
from jdd.methods import Method

# Folded into a step's synthetic-side key for the token-dropping draws (distinct from the augmentation's).
TOKEN_STREAM = 0x746F6B


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The single description of the compiled step: shapes, names and hyper-parameters (hashable).

    Built once from the config by :func:`make_spec`; nothing below reads the config again, so what
    the step computes is exactly what this record says.
    """
    num_classes: int
    ipc: int
    syn_param: str
    syn_res: int
    crop_res: int
    copies: int
    aug_ops: tuple[str, ...]
    aug_opts: tuple[tuple[str, Any], ...]
    augment_real: bool
    learn_labels: bool
    learn_images: bool        # False: the label-only baseline (images stay as initialised)
    real_source: str          # "backbone" | "cache" | "none" (the method needs no real features)
    real_per_class: int       # real images (or cached rows) per class each step
    accum_chunks: int         # the synthetic copies go through the backbone in this many chunks
    feature: str
    method_cfg: ml_collections.FrozenConfigDict  # the method's own hyper-parameters
    syn_lr: float             # Adam learning rates: images, soft-label logits, the method's own
    label_lr: float           # parameters (minimised) and its adversary (maximised)
    param_lr: float
    adv_lr: float
    lr_warmup: int            # steps of linear warm-up of every learning rate (0 = none)
    adam: tuple[float, float, float]  # Adam's (b1, b2, eps), shared by every optimiser
    decorrelate: bool         # synset option shared by init and decode
    extent: int               # pyramid: steps between added levels
    grow_mode: str
    reset_opt_on_grow: bool
    label_init_temp: float
    # Coarse-to-fine encoding: ((until_step, crop_res), ...): before step until_step the synthetic
    # copies (and an encoded real batch) are cropped to that lower resolution; then crop_res.
    res_schedule: tuple[tuple[int, int], ...] = ()
    # Token dropping (MAE / FLIP): the synthetic copies' forward keeps this fraction of each copy's
    # patch tokens (a random subset per copy and step; 1.0 = every token), before step
    # token_keep_until (0 = the whole run), then every token. The real side is never dropped.
    token_keep: float = 1.0
    token_keep_until: int = 0
    # Copies and crop scale as functions of the step: ((until_step, copies), ...) and ((until_step,
    # smallest crop area fraction), ...); after the last item, `copies` and the rrc_scale of aug_opts.
    copies_schedule: tuple[tuple[int, int], ...] = ()
    rrc_scale_schedule: tuple[tuple[int, float], ...] = ()

    def at_step(self, step: int) -> "StepSpec":
        """The spec of the step compiled for ``step``, every schedule resolved: crop resolution
        (``res_schedule``), token keep fraction (``token_keep_until``), copies (``copies_schedule``) and
        the crops' smallest area (``rrc_scale_schedule``). One compile per distinct resolved spec."""
        if not (self.res_schedule or self.token_keep_until or self.copies_schedule or self.rrc_scale_schedule):
            return self
        opts = dict(self.aug_opts)
        if self.rrc_scale_schedule:
            lo, hi = opts["rrc_scale"]
            opts["rrc_scale"] = (scheduled(self.rrc_scale_schedule, step, lo), hi)
        keep = self.token_keep if not self.token_keep_until or step < self.token_keep_until else 1.0
        return dataclasses.replace(
            self, crop_res=scheduled(self.res_schedule, step, self.crop_res),
            copies=scheduled(self.copies_schedule, step, self.copies), aug_opts=tuple(sorted(opts.items())),
            token_keep=keep, res_schedule=(), token_keep_until=0, copies_schedule=(), rrc_scale_schedule=())

    @property
    def num_images(self) -> int:
        return self.num_classes * self.ipc

    @property
    def synset_opts(self) -> dict:
        """Parametrisation options shared by init and decode."""
        return {"decorrelate": self.decorrelate}


def make_spec(config: ml_collections.ConfigDict, num_classes: int, method: Method) -> StepSpec:
    """The step's description from a run config (the only place the step's settings are read)."""
    aug, syn = config.augment, config.syn
    opts = dict(rrc_scale=tuple(aug.rrc_scale), noise_std=aug.noise_std)
    if aug.noise_mean:  # only when set, so every other config's compiled step is unchanged
        opts["noise_mean"] = float(aug.noise_mean)
    per_class = config.real.per_class or syn.ipc * aug.copies
    real_source = config.real.source if method.needs_real else "none"
    return StepSpec(
        num_classes=num_classes, ipc=syn.ipc, syn_param=syn.param,
        syn_res=syn.res, crop_res=config.data.crop_res, copies=aug.copies,
        aug_ops=augment.parse_ops(aug.ops), aug_opts=tuple(sorted(opts.items())),
        augment_real=aug.augment_real, learn_labels=syn.learn_labels, learn_images=syn.learn_images,
        real_source=real_source, real_per_class=per_class, accum_chunks=aug.accum_chunks,
        feature=config.backbone.feature, method_cfg=ml_collections.FrozenConfigDict(config.method),
        syn_lr=syn.lr, label_lr=syn.label_lr, param_lr=syn.param_lr or method.param_lr or syn.lr,
        adv_lr=syn.adv_lr or method.adv_lr or syn.lr, lr_warmup=syn.lr_warmup,
        adam=(float(syn.adam_b1), float(syn.adam_b2), float(syn.adam_eps)),
        decorrelate=syn.decorrelate, extent=syn.extent, grow_mode=syn.grow_mode,
        reset_opt_on_grow=syn.reset_opt_on_grow, label_init_temp=syn.label_init_temp,
        res_schedule=parse_res_schedule(aug.res_schedule),
        token_keep=float(aug.token_keep), token_keep_until=aug.token_keep_until,
        copies_schedule=parse_copies_schedule(aug.copies_schedule),
        rrc_scale_schedule=parse_rrc_scale_schedule(aug.rrc_scale_schedule))


def scheduled(schedule, step: int, after):
    """The value of a ((until_step, value), ...) schedule at ``step``; ``after`` once every item has ended."""
    return next((value for until, value in schedule if step < until), after)


def parse_schedule(key: str, text: str, what: str, cast, example: str) -> tuple[tuple[int, Any], ...]:
    """``"A:300,B:600"`` -> ((300, cast(A)), (600, cast(B))): A before step 300, B before step 600.

    Raises ValueError naming ``key`` for an item that is not ``WHAT:UNTIL_STEP`` or steps that do not
    increase. Range checks of the values belong to the caller (they depend on other keys)."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        value, sep, until = item.partition(":")
        try:
            if not sep or not until.strip().isdigit():
                raise ValueError
            out.append((int(until), cast(value.strip())))
        except ValueError:
            raise ValueError(f"{key} item {item!r} must be {what}:UNTIL_STEP, e.g. {example!r}") from None
    if [u for u, _ in out] != sorted({u for u, _ in out}):
        raise ValueError(f"{key} {text!r}: the steps must increase")
    return tuple(out)


def parse_res_schedule(text: str) -> tuple[tuple[int, int], ...]:
    """``"56:300,84:600"`` -> ((300, 56), (600, 84)): crops of 56 px before step 300, 84 px before 600."""
    return parse_schedule("augment.res_schedule", text, "RES", int, "56:300")


def parse_copies_schedule(text: str) -> tuple[tuple[int, int], ...]:
    """``"1:100"`` -> ((100, 1),): one augmented copy a step before step 100, then augment.copies."""
    return parse_schedule("augment.copies_schedule", text, "COPIES", int, "1:100")


def parse_rrc_scale_schedule(text: str) -> tuple[tuple[int, float], ...]:
    """``"0.8:100"`` -> ((100, 0.8),): crops keep >= 80% of the area before step 100, then rrc_scale."""
    return parse_schedule("augment.rrc_scale_schedule", text, "LO", float, "0.8:100")


def syn_class_labels(spec: StepSpec) -> jax.Array:
    """Class of each synthetic image, class-major: [M] int32 (image i belongs to class i // ipc)."""
    return jnp.repeat(jnp.arange(spec.num_classes, dtype=jnp.int32), spec.ipc)


def _adam(lr: float, warmup: int, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    schedule = optax.linear_schedule(0.0, lr, warmup) if warmup else lr
    return optax.adam(schedule, b1=b1, b2=b2, eps=eps)


def make_optimizers(spec: StepSpec) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """Adam on images (syn_lr), soft labels (label_lr) and method params (param_lr); Adam ascent on `adv`."""
    adam = lambda lr: _adam(lr, spec.lr_warmup, *spec.adam)  # noqa: E731
    params_opt = optax.multi_transform(
        {"syn": adam(spec.syn_lr), "labels": adam(spec.label_lr), "method": adam(spec.param_lr)},
        {"syn": "syn", "labels": "labels", "method": "method"})
    return params_opt, adam(spec.adv_lr)


def init_state(key, spec: StepSpec, *, method: Method, feat_dim: int, init_images: jax.Array | None) -> dict:
    """A fresh state at step 0 (``init_images`` [M, res, res, 3] in [0, 1] for real-image init)."""
    k_syn, k_method = jax.random.split(key)
    syn = synsets.init(spec.syn_param, k_syn, num_images=spec.num_images, res=spec.syn_res,
                       init_images=init_images, **spec.synset_opts)
    labels = {}
    if spec.learn_labels:
        onehot = jax.nn.one_hot(syn_class_labels(spec), spec.num_classes)
        labels = onehot / spec.label_init_temp
    mparams = method.init_params(k_method, feat_dim, spec.num_classes, spec.method_cfg)
    params = {"syn": syn, "labels": labels, "method": mparams["min"]}
    params_opt, adv_opt = make_optimizers(spec)
    # lr_scale multiplies every update: the loop sets it from the run's progress (jdd.loop.lr_scale),
    # because a decay must span the whole run, budget included, while the Adam states (and optax's
    # step counts) restart when a pyramid level is added.
    return {"step": jnp.zeros((), jnp.int32), "params": params, "adv": mparams["max"],
            "opt": {"params": params_opt.init(params), "adv": adv_opt.init(mparams["max"])},
            "lr_scale": jnp.ones((), jnp.float32), "rng": key}


# Tag folded into the run key for the random parts of pyramid growth (distinct from step keys).
_GROW_TAG = 0x67726F77


def grow(state: dict, spec: StepSpec, step: int) -> dict:
    """Adds a pyramid level when due at ``step``; resets (LGM) or carries over the image Adam state."""
    opts = {}
    if spec.syn_param == "pyramid":
        # Most steps add nothing: decide on the host before deriving a key (a device op per step).
        due = synsets.num_levels(step, res=spec.syn_res, extent=spec.extent)
        if due <= len(state["params"]["syn"]["levels"]):
            return state
        key = jax.random.fold_in(jax.random.fold_in(state["rng"], _GROW_TAG), step)
        opts = {"mode": spec.grow_mode, "key": key}
    syn, changed = synsets.grow(spec.syn_param, state["params"]["syn"], step=step, res=spec.syn_res,
                                extent=spec.extent, **opts)
    if not changed:
        return state
    params = dict(state["params"], syn=syn)
    params_opt, _ = make_optimizers(spec)
    fresh = params_opt.init(params)
    opt = fresh if spec.reset_opt_on_grow else _carry_over(state["opt"]["params"], fresh)
    return dict(state, params=params, opt=dict(state["opt"], params=opt))


def state_at(key, spec: StepSpec, step: int, *, method: Method, feat_dim: int,
             init_images: jax.Array | None) -> dict:
    """A state with the structure (pyramid levels, optimiser state) of ``step`` (values from init):
    the target a checkpoint of that step is restored into."""
    state = init_state(key, spec, method=method, feat_dim=feat_dim, init_images=init_images)
    for t in range(step):
        state = grow(state, spec, t)
    return state


def _carry_over(old, new):
    """Keeps old Adam moments wherever the new state has a leaf of the same path and shape."""
    old_leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(old)}

    def pick(path, x):
        prev = old_leaves.get(jax.tree_util.keystr(path))
        return prev if prev is not None and prev.shape == x.shape else x
    return jax.tree_util.tree_map_with_path(pick, new)


def syn_labels(params: dict, spec: StepSpec) -> jax.Array:
    """[M, C] label distribution of the synthetic images (one-hot unless labels are learned)."""
    if spec.learn_labels:
        return jax.nn.softmax(params["labels"], axis=-1)
    return jax.nn.one_hot(syn_class_labels(spec), spec.num_classes)


def sample_cache(key, cache: dict, spec: StepSpec) -> dict:
    """Draws ``real_per_class`` cached feature rows of every class (with replacement), in-step.

    ``cache``: {"feats": [N, V, D], "offsets": [C] int32, "counts": [C] int32} with rows sorted by
    class; a random augmented view of each drawn row is used.
    """
    k_row, k_view = jax.random.split(key)
    c, n = spec.num_classes, spec.real_per_class
    u = jax.random.uniform(k_row, (c, n))
    rows = cache["offsets"][:, None] + jnp.floor(u * cache["counts"][:, None]).astype(jnp.int32)
    rows = rows.reshape(-1)
    views = jax.random.randint(k_view, rows.shape, 0, cache["feats"].shape[1])
    labels = jnp.repeat(jnp.arange(c, dtype=jnp.int32), n)
    return {"feats": cache["feats"][rows, views], "labels": labels}


def encoder(feature_fn: Callable, spec: StepSpec) -> Callable:
    """The per-device encoder the step calls, ``(backbone params, batch) -> features``, for
    ``parallel.batch_map``. ``feature_fn(params, images, token_keep=None)`` is the run's embedding
    (``probe.embedder(...).func``); ``batch`` is images, or ``{"images", "token_keys"}`` (one key per
    image) for the synthetic copies of a token-dropping step, so each device drops, image by image,
    what one device would.
    """
    def encode(params, batch):
        if isinstance(batch, dict):
            return feature_fn(params, batch["images"], token_keep=(batch["token_keys"], spec.token_keep))
        return feature_fn(params, batch)
    return encode


def _token_keys(key, copy_ids, num_images: int) -> jax.Array:
    """One key per augmented copy, copy-major [len(copy_ids) * M]: copy c of image i always gets the same
    key within a step, so chunked copies (accum_chunks) drop exactly the tokens of the whole batch."""
    keys = jax.vmap(lambda c: jax.random.split(jax.random.fold_in(key, c), num_images))(copy_ids)
    return keys.reshape(-1, *keys.shape[2:])


def _augment_copies(key, images, copy_ids, spec: StepSpec) -> jax.Array:
    """Augmented copies ``copy_ids`` of every image, copy-major: [len(copy_ids) * M, crop, crop, 3].

    Copy c always uses ``fold_in(key, c)``, so a chunk of copies is augmented exactly as it would be in
    the whole batch: gradient accumulation changes memory, never the numbers.
    """
    aug = lambda c: augment.augment(jax.random.fold_in(key, c), images, ops=spec.aug_ops,
                                    out_res=spec.crop_res, **dict(spec.aug_opts))
    out = jax.vmap(aug)(copy_ids)
    return out.reshape(-1, *out.shape[2:])


def make_loss_and_grad(spec: StepSpec, method: Method, encode: Callable) -> Callable:
    """f(params, adv, consts, bb_params, real, key) -> ((loss, aux), (grad_params, grad_adv)).

    ``encode(bb_params, images) -> features`` is the device-parallel backbone (``parallel.batch_map`` of
    :func:`encoder`); with ``spec.token_keep < 1`` the synthetic copies go in as ``{"images",
    "token_keys"}``.
    ``real`` is {"image": [N, h, w, 3], "label": [N]}, in cache mode the cache arrays, or {} when
    the method needs no real features (``spec.real_source == "none"``).

    With ``spec.accum_chunks = K > 1`` the synthetic copies go through the backbone in K chunks, in
    two passes, and only one chunk's activations are alive at a time: (1) features of every chunk,
    without gradient; (2) the method's loss and its gradient w.r.t. those features (cheap); (3) per
    chunk, the backbone's vector-Jacobian product with that gradient, accumulated in a ``lax.scan``.
    Exact for every method (the loss sees all features at once), at the cost of one extra forward.
    """
    sopts = spec.synset_opts
    mcfg = spec.method_cfg
    k_chunks = spec.accum_chunks
    per_chunk = spec.copies // k_chunks

    def syn_feats(syn_params, bb_params, k_syn, copy_ids):
        if not spec.learn_images:  # no image gradient, so XLA drops the backward through the encoder
            syn_params = jax.lax.stop_gradient(syn_params)
        images = synsets.decode(spec.syn_param, syn_params, res=spec.syn_res, **sopts)
        copies = _augment_copies(k_syn, images, copy_ids, spec)
        if spec.token_keep < 1.0:
            k_tok = jax.random.fold_in(k_syn, TOKEN_STREAM)
            return encode(bb_params, {"images": copies, "token_keys": _token_keys(k_tok, copy_ids, spec.num_images)})
        return encode(bb_params, copies)

    def real_feats(bb_params, real, k_real):
        if spec.real_source == "none":
            return {}
        if spec.real_source == "cache":
            return sample_cache(k_real, real, spec)
        x = real["image"]
        if spec.augment_real:
            x = augment.augment(k_real, x, ops=spec.aug_ops, out_res=spec.crop_res, **dict(spec.aug_opts))
        if k_chunks > 1:  # forward only, but chunked too so the real batch never outweighs the synthetic one
            feats = jax.lax.map(lambda xc: encode(bb_params, xc), x.reshape(k_chunks, -1, *x.shape[1:]))
            feats = feats.reshape(-1, feats.shape[-1])
        else:
            feats = encode(bb_params, x)
        return {"feats": feats, "labels": real["label"]}

    def outer(params, adv, feats, consts, real_b, k_method):
        syn = {"feats": feats, "labels": jnp.tile(syn_labels(params, spec), (spec.copies, 1))}
        return method.loss({"min": params["method"], "max": adv}, consts, k_method, syn, real_b, mcfg)

    def loss_and_grad(params, adv, consts, bb_params, real, key):
        k_syn, k_real, k_method = jax.random.split(key, 3)
        real_b = jax.tree.map(jax.lax.stop_gradient, real_feats(bb_params, real, k_real))
        if k_chunks == 1:
            def total(params, adv):
                feats = syn_feats(params["syn"], bb_params, k_syn, jnp.arange(spec.copies))
                return outer(params, adv, feats, consts, real_b, k_method)
            return jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(params, adv)

        chunk_ids = jnp.arange(k_chunks)[:, None] * per_chunk + jnp.arange(per_chunk)  # [K, copies/K]
        feats = jax.lax.map(lambda ids: syn_feats(params["syn"], bb_params, k_syn, ids), chunk_ids)
        (loss, aux), (g_params, g_adv, g_feats) = jax.value_and_grad(outer, argnums=(0, 1, 2), has_aux=True)(
            params, adv, feats.reshape(-1, feats.shape[-1]), consts, real_b, k_method)
        g_feats = g_feats.reshape(feats.shape)

        def accumulate(acc, xs):
            ids, g = xs
            _, vjp = jax.vjp(lambda sp: syn_feats(sp, bb_params, k_syn, ids), params["syn"])
            return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

        zeros = jax.tree.map(jnp.zeros_like, params["syn"])
        g_syn, _ = jax.lax.scan(accumulate, zeros, (chunk_ids, g_feats))
        return (loss, aux), (dict(g_params, syn=g_syn), g_adv)

    return loss_and_grad


def all_finite(tree) -> jax.Array:
    """True when every float leaf of ``tree`` is finite (a scalar bool, computed on device)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_step(spec: StepSpec, method: Method, encode: Callable) -> Callable:
    """step(state, consts, bb_params, real) -> (state, metrics); pure, to be jitted by the caller.

    ``metrics["finite"]`` is 1 when the loss and the whole new state are finite: the loop checks it
    before any checkpoint is written, so a non-finite state is never saved.
    """
    loss_and_grad = make_loss_and_grad(spec, method, encode)
    params_opt, adv_opt = make_optimizers(spec)

    def step(state, consts, bb_params, real):
        key = jax.random.fold_in(state["rng"], state["step"])
        (loss, aux), (g_params, g_adv) = loss_and_grad(state["params"], state["adv"], consts, bb_params, real, key)
        scale = lambda u: jax.tree.map(lambda x: x * state["lr_scale"].astype(x.dtype), u)  # noqa: E731
        updates, opt_p = params_opt.update(g_params, state["opt"]["params"], state["params"])
        params = optax.apply_updates(state["params"], scale(updates))
        # Ascent: the adversary maximises the same loss the images minimise.
        neg = jax.tree.map(jnp.negative, g_adv)
        updates, opt_a = adv_opt.update(neg, state["opt"]["adv"], state["adv"])
        adv = optax.apply_updates(state["adv"], scale(updates))
        new = dict(state, step=state["step"] + 1, params=params, adv=adv,
                   opt={"params": opt_p, "adv": opt_a})
        finite = all_finite((loss, new["params"], new["adv"]))
        metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(g_params["syn"]),
                       finite=finite.astype(jnp.float32))
        return new, metrics

    return step
