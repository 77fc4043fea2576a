"""Linear-probe maths shared by the methods: softmax cross-entropy and its analytic gradients, inner
probe training with lax.scan, per-class label weights, and the ridge-regression probe.

A probe is the pytree `{"w": [D, C], "b": [C]}`, logits `z @ w + b`. Labels are `[n, C]` one-hot or
soft (non-negative) targets. Everything is computed in float32 whatever the input dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Gram matrices and the solves that use them are ill-conditioned by design (small ridge), so they are
# computed in true float32; TPUs (and GPUs with TF32) would otherwise use reduced-precision passes.
HIGHEST = jax.lax.Precision.HIGHEST


def f32(x):
    """`x` as a float32 jax array."""
    return jnp.asarray(x, jnp.float32)


def real_targets(real, num_classes: int):
    """Real features (stop-gradient, float32) [N, D] and one-hot targets [N, C]."""
    z = jax.lax.stop_gradient(f32(real["feats"]))
    return z, jax.nn.one_hot(real["labels"], num_classes, dtype=jnp.float32)


def l2_normalize(z, eps: float = 1e-12):
    """Rows of z [n, D] scaled to unit norm."""
    return z / jnp.sqrt(jnp.sum(z * z, axis=-1, keepdims=True) + eps)


def logits(params, z):
    """Probe logits `z @ w + b`: [n, D] -> [n, C]."""
    return z @ params["w"] + params["b"]


def softmax_ce(logits_, y, mask=None):
    """Mean over rows of the cross-entropy `-sum_k y_k log softmax(logits)_k`; y [n, C] soft targets.
    With ``mask`` [n] (1 = a real row, 0 = padding) the mean is over the real rows only."""
    ce = -jnp.sum(y * jax.nn.log_softmax(logits_, axis=-1), axis=-1)
    return jnp.mean(ce) if mask is None else jnp.sum(ce * mask) / jnp.sum(mask)


def ce_residual(params, z, y):
    """d(sum of per-row CE)/d(logits) = softmax * sum(y) - y, [n, C] (= softmax - y for normalised y)."""
    p = jax.nn.softmax(logits(params, z), axis=-1)
    return p * jnp.sum(y, axis=-1, keepdims=True) - y


def ce_grads(params, z, y):
    """Analytic gradient of `softmax_ce(logits(params, z), y)` w.r.t. the probe: `{"w": z^T r / n,
    "b": mean(r)}` with r the CE residual. Differentiable w.r.t. z and y (second order for free)."""
    r = ce_residual(params, z, y)
    n = z.shape[0]
    return {"w": z.T @ r / n, "b": jnp.mean(r, axis=0)}


def correct(logits_, labels):
    """Whether the top-1 class of logits [..., n, C] is the integer label [n]: bool [..., n]."""
    return jnp.argmax(logits_, axis=-1) == labels


def accuracy(logits_, labels):
    """Top-1 accuracy of logits [n, C] against integer labels [n]."""
    return jnp.mean(correct(logits_, labels).astype(jnp.float32))


def class_weights(y):
    """Per-class averaging weights from (soft) labels: `w[i, c] = y[i, c] / sum_i y[i, c]` [n, C], and
    `present` [C] (float 0/1) marking classes with non-zero total label mass. For one-hot labels,
    column c of w averages over the members of class c; soft labels give label-weighted means."""
    mass = jnp.sum(y, axis=0)
    present = (mass > 1e-8).astype(y.dtype)
    return y / jnp.where(present > 0, mass, 1.0), present


def lr_unit(z):
    """1 / mean squared norm of the rows of z (stop-gradient). The softmax-CE Hessian w.r.t. w is
    bounded by E[z z^T] / 2, so an inner learning rate `lr * lr_unit(z)` with lr ~ 1 is stable for any
    backbone's feature scale; inner-loop `lr` configs are in these units."""
    z = jax.lax.stop_gradient(z)
    return 1.0 / jnp.maximum(jnp.mean(jnp.sum(z * z, axis=-1)), 1e-12)


def adam_lr_unit(z):
    """1 / root-mean-square entry of z (stop-gradient): Adam moves each weight by ~lr per step, so a
    logit moves by ~lr * sum_d |z_d|; in these units one Adam lr suits any feature scale."""
    z = jax.lax.stop_gradient(z)
    return jax.lax.rsqrt(jnp.maximum(jnp.mean(z * z), 1e-24))


def init_probe(key, feat_dim: int, num_classes: int, std: float):
    """A random probe: w ~ N(0, std^2) [D, C], b = 0 [C]."""
    return {"w": std * jax.random.normal(key, (feat_dim, num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}


def pad_batches(x, batch: int, fill=0):
    """x [n, ...] padded with ``fill`` rows to a multiple of ``batch`` and split: [ceil(n / batch), batch, ...].

    The one pad-and-batch of the project (probe training, test accuracy, embedding, full-data fits):
    callers mask or drop the padded rows (labels padded with -1 never match a prediction).
    """
    pad = (-x.shape[0]) % batch
    x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])
    return x.reshape(-1, batch, *x.shape[1:])


def flatten(params):
    """The probe as one vector [D * C + C] (w then b)."""
    return jnp.concatenate([params["w"].ravel(), params["b"].ravel()])


def inner_optimizer(name: str, lr):
    """The inner-loop optimizer: "sgd" (plain gradient descent) or "adam". Adam uses `eps_root` so
    that differentiating through sqrt(v) stays finite where a gradient entry is exactly zero."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "adam":
        return optax.adam(lr, eps_root=1e-16)
    raise ValueError(f"inner optimizer {name!r} is not one of ('sgd', 'adam').")


def train_probe(params, z, y, *, steps: int, lr, optimizer: str = "sgd", batches=None,
                checkpoint: bool = False):
    """Train a probe on (z [n, D], y [n, C]) with `steps` steps of `optimizer` at a fixed `lr`
    (absolute units) using lax.scan; differentiable w.r.t. z, y, lr and the initial params.

    batches: optional int [steps, B] row indices of a minibatch per step (None: full batch).
    checkpoint: wrap the scan body in jax.checkpoint, so reverse mode stores only the carry of each
      step (O(steps * |params|)) and recomputes the step's activations, instead of keeping every
      step's [n, C] softmax; this bounds memory for long unrolls (steps ~ 100).
    Returns the final probe.
    """
    opt = inner_optimizer(optimizer, lr)

    def body(carry, idx):
        p, state = carry
        zb, yb = (z, y) if idx is None else (z[idx], y[idx])
        updates, state = opt.update(ce_grads(p, zb, yb), state, p)
        return (optax.apply_updates(p, updates), state), None

    if checkpoint:
        body = jax.checkpoint(body)
    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), batches,
                                  length=None if batches is not None else steps)
    return params


def regression_targets(y, center: bool):
    """Ridge-regression targets: y [n, C] minus 1/C when `center` (zero-mean rows for one-hot y)."""
    return y - 1.0 / y.shape[-1] if center else y


def spd_solve(a, b):
    """Solve `a x = b` for symmetric positive-definite a [n, n] (b [n, k]).

    LU (jnp.linalg.solve) rather than Cholesky: equally accurate here, and on CPU its forward+backward
    was much faster (best of 20, float32: n=100 0.15 ms vs 25 ms, n=384 2.4 vs 10 ms, n=768 17 vs
    135 ms), because the reverse mode of the LU solve reuses the factors for one transposed solve while
    JAX's Cholesky backward is a slow expansion on CPU.
    """
    return jnp.linalg.solve(a, b)


def ridge_lambda(z, ridge):
    """Ridge scaled by the kernel trace: `ridge * tr(z z^T) / n = ridge * mean ||z_i||^2`, so one
    `ridge` means the same amount of regularisation for any feature scale and set size."""
    return ridge * jnp.sum(z * z) / z.shape[0]


def kernel_ridge_coef(k, y, ridge):
    """Dual coefficients `(k + lam I)^-1 y` [n, C] of kernel ridge regression, lam = ridge * tr(k) / n."""
    n = k.shape[0]
    lam = ridge * jnp.trace(k) / n
    return spd_solve(k + lam * jnp.eye(n, dtype=k.dtype), y)


def ridge_probe(z, y, ridge, *, form: str = "auto", fit_bias: bool = False):
    """Closed-form ridge-regression probe fitted on (z [n, D], y [n, C]); returns `{"w", "b"}`.

    w = z^T (z z^T + lam I)^-1 y  (dual, an n x n solve) = (z^T z + lam I)^-1 z^T y  (primal, D x D),
    lam = ridge * mean ||z_i||^2. form "auto" picks the smaller system. With fit_bias the intercept
    is unpenalised: z and y are centred by their means and b = mean(y) - mean(z) w.
    """
    n, d = z.shape
    if form == "auto":
        form = "dual" if n <= d else "primal"
    if fit_bias:
        z_mean, y_mean = jnp.mean(z, axis=0), jnp.mean(y, axis=0)
        z, y = z - z_mean, y - y_mean
    lam = ridge_lambda(z, ridge)
    if form == "dual":
        gram = jnp.matmul(z, z.T, precision=HIGHEST)
        w = jnp.matmul(z.T, spd_solve(gram + lam * jnp.eye(n, dtype=z.dtype), y), precision=HIGHEST)
    elif form == "primal":
        cov = jnp.matmul(z.T, z, precision=HIGHEST)
        w = spd_solve(cov + lam * jnp.eye(d, dtype=z.dtype), jnp.matmul(z.T, y, precision=HIGHEST))
    else:
        raise ValueError(f"ridge form {form!r} is not one of ('auto', 'dual', 'primal').")
    b = y_mean - z_mean @ w if fit_bias else jnp.zeros((y.shape[1],), z.dtype)
    return {"w": w, "b": b}
