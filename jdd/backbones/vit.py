"""The one Flax Vision Transformer behind every backbone family, configured by `ViTConfig`.

The families differ only in switches of the config: class token and registers, layer scale, the
MLP activation (or SwiGLU), a key projection without bias and sub-layernorms inside attention and
MLP (EVA), rotary position embeddings (EVA-02), a layernorm before the encoder (CLIP), where the
final layernorm applies (all tokens, the class token only as in CLIP, or the average-pooled patch
tokens as timm's `fc_norm`), and how the probe embedding is pooled (normed class token, its linear
projection, the patch mean, or SigLIP's multi-head attention pooling).

Parameters are always float32; `dtype` is the compute dtype. Inputs are NHWC images in [0, 1]; the
family's mean/std normalisation happens inside.

Token dropping (as in MAE / FLIP): `apply(..., images, token_keep=(key, fraction))` keeps a random
subset of round(fraction * num_patches) patch tokens per image (after their position embeddings are
added; class and register tokens always stay), so the transformer runs on fewer tokens. The number
kept is static (fraction is a Python float), so shapes are static under jit; `patch_keep_indices`
gives the kept patches for a key. Rotary embeddings (EVA-02) follow the kept patches.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdd.backbones import posemb, rope

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

# Initialisers for random (untrained) models: the truncated normal of std 0.02 that ViTs use.
INIT_STD = 0.02
_init = nn.initializers.truncated_normal(INIT_STD)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), through erf as PyTorch writes it.

    jax.nn.gelu(approximate=False) goes through erfc, which XLA's CPU backend lowers to an exp and
    two selects per element, and whose backward keeps more residuals: the input gradient of DINOv2-S
    (20 images, 112 px) needs 423 instead of 520 MB of XLA temporaries with this form (with the fused
    q/k/v below). Its time did not change measurably (paired runs, new/old 0.91-1.05). Same function
    (float32 differences at the ulp level).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype)))


# Activation names as `transformers` configs spell them (`hidden_act`), plus "swiglu".
ACTIVATIONS = {
    "gelu": gelu_erf,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
SWIGLU = "swiglu"
# The final layernorm: over all output tokens, over the class token only (CLIP), or over the
# average of the patch tokens (timm's fc_norm; then also over the class token, for features["cls"]).
FINAL_NORMS = ("tokens", "cls", "pooled")
POOLS = ("cls", "proj", "map", "patch_mean")  # what `features["embedding"]` is


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of one ViT; hashable so that it can be a static Flax module attribute.

    width/depth/heads/mlp_dim: transformer sizes (mlp_dim is the hidden size of each MLP branch).
    patch_size: square patch side in pixels; image_size: native resolution of the position embeddings.
    """

    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    act: str = "gelu"  # a key of ACTIVATIONS, or SWIGLU (gated SiLU; mlp_dim is each branch's size)
    class_token: bool = True
    num_registers: int = 0
    layer_scale: bool = False
    qkv_bias: bool = True
    key_bias: bool = True  # False: with qkv_bias, only query and value have a bias (EVA)
    attn_norm: bool = False  # layernorm on the attention output before its projection (timm scale_attn_inner)
    mlp_norm: bool = False  # layernorm on the MLP hidden activations before fc2 (EVA-02 B/L, timm scale_mlp)
    rope: bool = False  # rotary position embeddings on the patch tokens' queries and keys (EVA-02)
    rope_temperature: float = 10000.0
    rope_ref_grid: tuple[int, int] | None = None  # rotary positions rescaled to this grid (timm ref_feat_shape)
    patch_bias: bool = True
    pre_norm: bool = False
    final_norm: str = "tokens"
    pool: str = "cls"
    projection_dim: int = 0
    ln_eps: float = 1e-6
    pos_antialias: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.act not in ACTIVATIONS and self.act != SWIGLU:
            raise ValueError(f"unknown activation {self.act!r}; known: {sorted(ACTIVATIONS) + [SWIGLU]}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
        if self.final_norm not in FINAL_NORMS:
            raise ValueError(f"final_norm must be one of {FINAL_NORMS}, got {self.final_norm!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.pool == "proj" and self.projection_dim <= 0:
            raise ValueError("pool='proj' needs projection_dim > 0")
        if self.pool in ("cls", "proj") and not self.class_token:
            raise ValueError(f"pool={self.pool!r} needs a class token")
        if self.final_norm == "pooled" and self.pool != "patch_mean":
            raise ValueError("final_norm='pooled' normalises the patch mean: it needs pool='patch_mean'")
        if self.rope and (self.width // self.heads) % 4:
            raise ValueError(f"rotary embeddings need a head size divisible by 4, got {self.width // self.heads}")

    @property
    def grid(self) -> int:
        """Side of the native grid of position embeddings."""
        return self.image_size // self.patch_size

    @property
    def embed_dim(self) -> int:
        """Size of `features["embedding"]`."""
        return self.projection_dim if self.pool == "proj" else self.width


def _dense(features, name, dtype, use_bias=True, axis=-1):
    return nn.DenseGeneral(features, axis=axis, use_bias=use_bias, dtype=dtype, kernel_init=_init, name=name)


class Attention(nn.Module):
    """Multi-head self-attention; q/k/v kernels [D, H, hd], output kernel [H, hd, D].

    rope_sin_cos: (sin, cos) rotary tables of the last N tokens (the patches), [N, hd] shared by the
      batch or [B, N, hd] per image (token dropping), or None.
    """

    cfg: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rope_sin_cos=None) -> jax.Array:
        cfg = self.cfg
        head_dim = cfg.width // cfg.heads
        bias = {"query": cfg.qkv_bias, "key": cfg.qkv_bias and cfg.key_bias, "value": cfg.qkv_bias}
        shape = (cfg.heads, head_dim)
        kernels, biases = zip(*(_Projection(shape, bias[n], name=n)(x.shape[-1]) for n in ("query", "key", "value")))
        # One [D, 3D] matmul instead of three [D, D] ones (and one in the backward pass): larger matmuls
        # for the accelerators' and CPU's kernels (on this CPU no measurable change in paired runs). The
        # parameters stay three kernels, as checkpoints store them.
        kernel = jnp.concatenate(kernels, axis=1).astype(self.dtype)  # [D, 3H, hd]
        qkv = jnp.einsum("btd,dhk->bthk", x.astype(self.dtype), kernel)
        qkv = qkv + jnp.concatenate([b if b is not None else jnp.zeros(shape) for b in biases]).astype(self.dtype)
        q, k, v = jnp.split(qkv, 3, axis=2)
        if rope_sin_cos is not None:
            q, k = (_apply_rope(t, *rope_sin_cos) for t in (q, k))
        out = attention(q, k, v)
        if cfg.attn_norm:  # over all heads together, as one [D] vector per token
            out = nn.LayerNorm(cfg.ln_eps, dtype=self.dtype, name="norm")(out.reshape(x.shape)).reshape(out.shape)
        return _dense(cfg.width, "out", self.dtype, axis=(-2, -1))(out)


class _Projection(nn.Module):
    """The kernel [D, *shape] and bias [*shape] (or None) of one q/k/v projection, as nn.DenseGeneral
    names and initialises them; the caller fuses the three matmuls into one."""

    shape: tuple[int, ...]
    use_bias: bool

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", _init, (in_features, *self.shape), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, self.shape, jnp.float32) if self.use_bias else None
        return kernel, bias


def _apply_rope(x: jax.Array, sin, cos) -> jax.Array:
    """Rotary embeddings on the last N tokens of x [B, T, H, hd]: tables [N, hd], or [B, N, hd] when each
    image kept different patches (then gathered per image; computed in float32 as timm does)."""
    if sin.ndim == 2:
        return rope.apply_to_patches(x, sin, cos)
    num = sin.shape[1]
    prefix, patches = x[:, :-num], x[:, -num:].astype(jnp.float32)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    rotated = (patches * cos + rope.rotate_pairs(patches) * sin).astype(x.dtype)
    return jnp.concatenate([prefix, rotated], axis=1) if prefix.shape[1] else rotated


def num_kept_patches(num_patches: int, fraction: float) -> int:
    """Static number of patch tokens token dropping keeps: round(fraction * num_patches), at least 1."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):  # not a traced value
        raise TypeError(f"the token keep fraction must be a Python float (it fixes a static shape), got "
                        f"{type(fraction).__name__}; pass e.g. token_keep=(key, 0.5).")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the token keep fraction must be in (0, 1], got {fraction}; 1.0 keeps every patch.")
    return max(1, round(fraction * num_patches))


def _is_key_per_image(key: jax.Array) -> bool:
    """True for a batch of keys [B] (typed) / [B, 2] (raw uint32), False for one key."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return key.ndim == (1 if typed else 2)


def patch_keep_indices(key: jax.Array, batch: int, num_patches: int, fraction: float) -> jax.Array:
    """Indices [B, K] (ascending, distinct) of the patches each image keeps, K = num_kept_patches.

    Each image draws its own uniformly random subset (argsort of uniform noise, as MAE does). ``key``
    is one key for the batch, or one key per image ([B] typed / [B, 2] raw): then image i's subset
    depends on its own key alone, so a batch split over devices drops what the whole batch would.
    """
    num_keep = num_kept_patches(num_patches, fraction)
    if _is_key_per_image(key):
        if key.shape[0] != batch:
            raise ValueError(f"token dropping got {key.shape[0]} per-image keys for a batch of {batch} images")
        noise = jax.vmap(lambda k: jax.random.uniform(k, (num_patches,)))(key)
    else:
        noise = jax.random.uniform(key, (batch, num_patches))
    return jnp.sort(jnp.argsort(noise, axis=1)[:, :num_keep], axis=1)


# On CPU, attention runs over chunks of the batch whose logits take about this many bytes, so that they
# stay in cache. Measured at 224 px, batch 32 (DINOv2-S shapes): the attention op alone ~4x faster
# forward and ~1.7x forward + backward than one einsum over the whole batch (on par with PyTorch's
# fused SDPA kernel); the whole model ~10% less CPU time forward and ~18% forward + backward.
CPU_ATTENTION_CHUNK_BYTES = 4 * 2**20


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention of [B, T, H, hd] queries and [B, S, H, hd] keys/values -> [B, T, H, hd].

    On CPU the batch is processed in cache-sized chunks (`lax.map`, rematerialised in the backward
    pass); elsewhere in one piece. Plain einsums measured as fast on CPU as
    jax.nn.dot_product_attention(implementation="xla"), and a fused q/k/v projection gained nothing.
    """
    if jax.default_backend() != "cpu":
        return dense_attention(q, k, v)
    batch, queries, heads, _ = q.shape
    per_sample = heads * queries * k.shape[1] * 4
    chunk = largest_divisor_at_most(batch, max(1, CPU_ATTENTION_CHUNK_BYTES // per_sample))
    if chunk == batch:
        return dense_attention(q, k, v)
    split = lambda t: t.reshape(batch // chunk, chunk, *t.shape[1:])  # noqa: E731
    out = jax.lax.map(jax.checkpoint(lambda qkv: dense_attention(*qkv)), (split(q), split(k), split(v)))
    return out.reshape(q.shape)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Attention in one piece; heads-first layout (faster batched dots on CPU), softmax in float32."""
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3)


def largest_divisor_at_most(n: int, bound: int) -> int:
    """The largest divisor of n that is <= bound (bound >= 1)."""
    return max(d for d in range(1, min(n, bound) + 1) if n % d == 0)


class Mlp(nn.Module):
    """Two-layer MLP; with SWIGLU, one fused input kernel [D, 2 * mlp_dim] = [gate | up].

    With cfg.mlp_norm, a layernorm over the hidden activations comes before fc2.
    """

    cfg: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        if cfg.act == SWIGLU:
            gate, up = jnp.split(_dense(2 * cfg.mlp_dim, "fc1", self.dtype)(x), 2, axis=-1)
            h = jax.nn.silu(gate) * up
        else:
            h = ACTIVATIONS[cfg.act](_dense(cfg.mlp_dim, "fc1", self.dtype)(x))
        if cfg.mlp_norm:
            h = nn.LayerNorm(cfg.ln_eps, dtype=self.dtype, name="norm")(h)
        return _dense(cfg.width, "fc2", self.dtype)(h)


class LayerScale(nn.Module):
    """Per-channel scaling of a residual branch (DINOv2)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return x * gamma.astype(self.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + a(LN(x)), then x + m(LN(x)), optionally layer-scaled."""

    cfg: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rope_sin_cos=None) -> jax.Array:
        cfg = self.cfg
        ln = lambda name: nn.LayerNorm(cfg.ln_eps, dtype=self.dtype, name=name)  # noqa: E731
        y = Attention(cfg, self.dtype, name="attn")(ln("norm1")(x), rope_sin_cos)
        if cfg.layer_scale:
            y = LayerScale(self.dtype, name="ls1")(y)
        x = x + y
        y = Mlp(cfg, self.dtype, name="mlp")(ln("norm2")(x))
        if cfg.layer_scale:
            y = LayerScale(self.dtype, name="ls2")(y)
        return x + y


class MapHead(nn.Module):
    """SigLIP's multi-head attention pooling: a learned probe attends over the tokens, then LN + MLP.

    The attention keeps PyTorch's fused input projection: kernel [D, 3D] = [query | key | value].
    """

    cfg: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        batch, _, dim = x.shape
        head_dim = dim // cfg.heads
        probe = self.param("probe", _init, (1, 1, dim), jnp.float32).astype(self.dtype)
        in_kernel = self.param("in_kernel", _init, (dim, 3 * dim), jnp.float32).astype(self.dtype)
        in_bias = self.param("in_bias", nn.initializers.zeros, (3 * dim,), jnp.float32).astype(self.dtype)
        wq, wk, wv = jnp.split(in_kernel, 3, axis=1)
        bq, bk, bv = jnp.split(in_bias, 3)
        split = lambda t: t.reshape(*t.shape[:-1], cfg.heads, head_dim)  # noqa: E731
        q = split(jnp.broadcast_to(probe @ wq + bq, (batch, 1, dim)))
        out = attention(q, split(x @ wk + bk), split(x @ wv + bv)).reshape(batch, 1, dim)
        out = _dense(dim, "out", self.dtype)(out)
        out = out + Mlp(cfg, self.dtype, name="mlp")(nn.LayerNorm(cfg.ln_eps, dtype=self.dtype, name="norm")(out))
        return out[:, 0]


class ViT(nn.Module):
    """images [B, H, W, 3] in [0, 1] -> dict of features (see `__call__`).

    remat: recompute each block's activations in the backward pass instead of storing them
    (`nn.remat`): the memory of a gradient through the encoder drops to about one block's worth,
    for about one more forward. Same numbers either way. Measured on XLA:CPU (temporaries of the
    input gradient): 0.74x at 64 images x 64 tokens, but only 0.97x for DINOv2-S at 20 images x
    112 px, where the stored activations no longer dominate; it is meant for large batches.
    """

    cfg: ViTConfig
    dtype: Any = jnp.float32
    remat: bool = False

    def embed(self, images: jax.Array) -> jax.Array:
        """Normalised images -> [B, T, D] tokens: [class] + [registers] + patches, with positions."""
        cfg = self.cfg
        batch, height, width, channels = images.shape
        p = cfg.patch_size
        gh, gw = height // p, width // p
        x = (images.astype(jnp.float32) - jnp.asarray(cfg.mean)) / jnp.asarray(cfg.std)
        # Non-overlapping patches as one matmul; faster on CPU than a strided convolution.
        patches = x.astype(self.dtype).reshape(batch, gh, p, gw, p, channels)
        kernel = self.param("patch_kernel", _init, (p, p, channels, cfg.width), jnp.float32)
        tokens = jnp.einsum("bhpwqc,pqcd->bhwd", patches, kernel.astype(self.dtype)).reshape(batch, gh * gw, -1)
        if cfg.patch_bias:
            bias = self.param("patch_bias", nn.initializers.zeros, (cfg.width,), jnp.float32)
            tokens = tokens + bias.astype(self.dtype)
        num_pos = cfg.grid**2 + int(cfg.class_token)
        pos = self.param("pos_embedding", _init, (num_pos, cfg.width), jnp.float32)
        patch_pos = posemb.resample_grid(pos[int(cfg.class_token):], (gh, gw), cfg.pos_antialias)
        tokens = tokens + patch_pos.astype(self.dtype)
        prefix = []
        if cfg.class_token:
            cls = self.param("cls_token", _init, (cfg.width,), jnp.float32)
            prefix.append(jnp.broadcast_to((cls + pos[0]).astype(self.dtype), (batch, 1, cfg.width)))
        if cfg.num_registers:
            regs = self.param("registers", _init, (cfg.num_registers, cfg.width), jnp.float32)
            prefix.append(jnp.broadcast_to(regs.astype(self.dtype), (batch, cfg.num_registers, cfg.width)))
        return jnp.concatenate(prefix + [tokens], axis=1) if prefix else tokens

    @nn.compact
    def __call__(self, images: jax.Array, token_keep: tuple[jax.Array, float] | None = None
                 ) -> dict[str, jax.Array]:
        """Returns float32 features of images [B, H, W, 3]:

        cls [B, D]: the class token after the final layernorm (families with a class token);
        patch_mean [B, D]: mean of the patch tokens of last_hidden_state (final_norm "pooled": that
            mean after the final layernorm, timm's pooled features);
        embedding [B, E]: the probe feature (normed class token, its projection, the patch mean, or
            attention pooling);
        last_hidden_state [B, T, D]: as `transformers` returns it (CLIP: before the post-layernorm),
            or timm's `forward_features` (final_norm "pooled": before the final layernorm).

        token_keep: None (every patch), or (key, fraction): each image keeps a random subset of
            `num_kept_patches(num_patches, fraction)` patch tokens (`patch_keep_indices(key, ...)`; key:
            one for the batch or one per image),
            chosen after the position embeddings are added; patch_mean and last_hidden_state then cover
            the prefix tokens and the kept patches only. A fraction that keeps every patch is the
            plain forward, bit for bit.
        """
        cfg = self.cfg
        ln = lambda name: nn.LayerNorm(cfg.ln_eps, dtype=self.dtype, name=name)  # noqa: E731
        x = self.embed(images)
        grid = (images.shape[1] // cfg.patch_size, images.shape[2] // cfg.patch_size)
        rope_sin_cos = None
        if cfg.rope:  # built in NumPy from the static grid shape, at trace time
            rope_sin_cos = rope.sin_cos(cfg.width // cfg.heads, grid, cfg.rope_temperature, cfg.rope_ref_grid)
        first_patch = int(cfg.class_token) + cfg.num_registers
        if token_keep is not None:
            key, fraction = token_keep
            num_patches = grid[0] * grid[1]
            if num_kept_patches(num_patches, fraction) < num_patches:
                keep = patch_keep_indices(key, x.shape[0], num_patches, fraction)  # [B, K]
                kept = jnp.take_along_axis(x[:, first_patch:], keep[:, :, None], axis=1)
                x = jnp.concatenate([x[:, :first_patch], kept], axis=1)
                if rope_sin_cos is not None:  # each image's kept patches keep their own rotations
                    rope_sin_cos = tuple(jnp.asarray(t)[keep] for t in rope_sin_cos)
        if cfg.pre_norm:
            x = ln("pre_norm")(x)
        block = nn.remat(Block) if self.remat else Block
        for i in range(cfg.depth):
            x = block(cfg, self.dtype, name=f"block_{i}")(x, rope_sin_cos)
        features = {}
        patches = lambda t: jnp.mean(t[:, first_patch:].astype(jnp.float32), axis=1)  # noqa: E731
        if cfg.final_norm == "tokens":
            x = ln("norm")(x)
            if cfg.class_token:
                features["cls"] = x[:, 0]
            features["patch_mean"] = patches(x)
        elif cfg.final_norm == "cls":
            features["cls"] = ln("norm")(x[:, 0])
            features["patch_mean"] = patches(x)
        else:
            norm = ln("norm")
            if cfg.class_token:
                features["cls"] = norm(x[:, 0])
            features["patch_mean"] = norm(patches(x))
        features["last_hidden_state"] = x
        if cfg.pool == "cls":
            features["embedding"] = features["cls"]
        elif cfg.pool == "proj":
            features["embedding"] = _dense(cfg.projection_dim, "proj", self.dtype, use_bias=False)(features["cls"])
        elif cfg.pool == "map":
            features["embedding"] = MapHead(cfg, self.dtype, name="head")(x)
        else:
            features["embedding"] = features["patch_mean"]
        return {k: v.astype(jnp.float32) for k, v in features.items()}
