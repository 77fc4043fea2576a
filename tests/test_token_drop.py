"""Token dropping in the ViT (`token_keep=(key, fraction)`): the plain forward at fraction 1, static
token counts, determinism in the key, zero gradient at the dropped patches, rotary embeddings that follow
the kept patches (EVA-02), jit and remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdd.backbones as bb
from jdd.backbones import vit

FAMILY_NAMES = sorted(bb.FAMILIES)
SIZE, PATCH = 32, 8  # the "test" variants: a 4 x 4 grid of 8 px patches, no overlap
NUM_PATCHES = (SIZE // PATCH) ** 2
KEY = jax.random.PRNGKey(0)


def _images(batch=3, seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), (batch, SIZE, SIZE, 3))


def _prefix(backbone):
    cfg = backbone.config
    return int(cfg.class_token) + cfg.num_registers


def _apply(backbone, images, token_keep=None):
    return backbone.module.apply({"params": backbone.params}, images, token_keep=token_keep)


@pytest.mark.slow  # the fast tier keeps the gradient and position tests below
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fraction_one_is_the_plain_forward_and_fewer_tokens_otherwise(family):
    backbone = bb.create(family, "test")
    images = _images()
    plain = backbone.apply(backbone.params, images)
    for out in (_apply(backbone, images), _apply(backbone, images, (KEY, 1.0))):
        for name in plain:
            np.testing.assert_array_equal(out[name], plain[name])
    for fraction, kept in [(0.5, 8), (0.3, 5), (0.01, 1)]:
        out = _apply(backbone, images, (KEY, fraction))
        assert vit.num_kept_patches(NUM_PATCHES, fraction) == kept
        assert out["last_hidden_state"].shape == (3, _prefix(backbone) + kept, backbone.config.width)
        assert out["embedding"].shape == plain["embedding"].shape
        assert np.all(np.isfinite(out["embedding"]))
        assert not np.allclose(out["embedding"], plain["embedding"])


def test_keep_indices_deterministic_per_key_distinct_and_different_per_image_and_key():
    a = vit.patch_keep_indices(KEY, 4, NUM_PATCHES, 0.5)
    np.testing.assert_array_equal(a, vit.patch_keep_indices(KEY, 4, NUM_PATCHES, 0.5))
    assert a.shape == (4, 8)
    for row in np.asarray(a):
        assert len(set(row)) == 8 and np.all(np.diff(row) > 0) and 0 <= row.min() and row.max() < NUM_PATCHES
    assert len({tuple(r) for r in np.asarray(a)}) > 1  # images draw their own subsets
    b = vit.patch_keep_indices(jax.random.PRNGKey(1), 4, NUM_PATCHES, 0.5)
    assert not np.array_equal(a, b)

    backbone = bb.create("dinov2", "test")
    images = _images()
    out_a = _apply(backbone, images, (KEY, 0.5))["embedding"]
    np.testing.assert_array_equal(out_a, _apply(backbone, images, (KEY, 0.5))["embedding"])
    assert not np.allclose(out_a, _apply(backbone, images, (jax.random.PRNGKey(1), 0.5))["embedding"])


@pytest.mark.slow
def test_per_image_keys_make_each_subset_independent_of_the_batch():
    """One key per image (raw [B, 2] or typed [B]): image i keeps what it keeps alone, so a batch split
    over devices drops exactly the tokens of the whole batch; a key count that does not match is refused."""
    keys = jax.random.split(KEY, 4)
    whole = vit.patch_keep_indices(keys, 4, NUM_PATCHES, 0.5)
    for i in range(4):
        np.testing.assert_array_equal(whole[i:i + 1], vit.patch_keep_indices(keys[i:i + 1], 1, NUM_PATCHES, 0.5))
    typed = vit.patch_keep_indices(jax.random.wrap_key_data(keys), 4, NUM_PATCHES, 0.5)
    np.testing.assert_array_equal(typed, whole)
    assert len({tuple(r) for r in np.asarray(whole)}) > 1
    with pytest.raises(ValueError, match="3 per-image keys for a batch of 4"):
        vit.patch_keep_indices(keys[:3], 4, NUM_PATCHES, 0.5)
    backbone = bb.create("dinov2", "test")
    images = _images(batch=4)
    out = _apply(backbone, images, (keys, 0.5))["embedding"]
    np.testing.assert_allclose(out[2:], _apply(backbone, images[2:], (keys[2:], 0.5))["embedding"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["dinov2", pytest.param("siglip", marks=pytest.mark.slow),  # class token; none
                                    pytest.param("eva02", marks=pytest.mark.slow)])  # (MAP pooling); rope
def test_gradient_is_zero_exactly_at_dropped_patches(family):
    backbone = bb.create(family, "test")
    images = _images()
    direction = jax.random.normal(jax.random.PRNGKey(2), (3, backbone.embed_dim))
    fraction = 0.5
    grad = jax.grad(lambda x: jnp.sum(_apply(backbone, x, (KEY, fraction))["embedding"] * direction))(images)
    keep = np.asarray(vit.patch_keep_indices(KEY, 3, NUM_PATCHES, fraction))
    grid = SIZE // PATCH
    per_patch = np.abs(np.asarray(grad)).reshape(3, grid, PATCH, grid, PATCH, 3).sum(axis=(2, 4, 5))
    per_patch = per_patch.reshape(3, NUM_PATCHES)
    for i in range(3):
        kept = np.zeros(NUM_PATCHES, bool)
        kept[keep[i]] = True
        assert np.all(per_patch[i, ~kept] == 0.0), (i, per_patch[i])
        assert np.all(per_patch[i, kept] > 0.0), (i, per_patch[i])


@pytest.mark.parametrize("family", ["dinov2_registers", "eva02"])
def test_kept_tokens_carry_their_own_positions(family, monkeypatch):
    """A ViT is equivariant to the order of its patch tokens when each carries its own position
    (embedding added before dropping, rotary tables gathered with the tokens): "keeping" every patch in
    a shuffled order per image must reproduce the plain features."""
    backbone = bb.create(family, "test")
    images = _images()
    perms = jnp.stack([jax.random.permutation(k, NUM_PATCHES) for k in jax.random.split(KEY, 3)])
    monkeypatch.setattr(vit, "patch_keep_indices", lambda key, batch, n, fraction: perms)
    shuffled = _apply(backbone, images, (KEY, 0.5))  # 0.5 takes the dropping branch; perms keep all
    plain = backbone.apply(backbone.params, images)
    assert shuffled["last_hidden_state"].shape == plain["last_hidden_state"].shape
    for name in ("embedding", "patch_mean"):
        np.testing.assert_allclose(shuffled[name], plain[name], rtol=1e-4, atol=1e-5)
    prefix = _prefix(backbone)
    tokens = np.take_along_axis(np.asarray(plain["last_hidden_state"][:, prefix:]),
                                np.asarray(perms)[:, :, None], axis=1)
    np.testing.assert_allclose(shuffled["last_hidden_state"][:, prefix:], tokens, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_jit_and_remat_match_eager():
    backbone = bb.create("eva02", "test")
    images = _images()
    eager = _apply(backbone, images, (KEY, 0.5))["embedding"]
    jitted = jax.jit(lambda p, x, k: backbone.module.apply({"params": p}, x, token_keep=(k, 0.5)))
    np.testing.assert_allclose(jitted(backbone.params, images, KEY)["embedding"], eager, rtol=1e-5, atol=1e-6)
    remat = backbone.module.clone(remat=True)
    grad = lambda m: jax.grad(  # noqa: E731
        lambda x: jnp.sum(m.apply({"params": backbone.params}, x, token_keep=(KEY, 0.5))["embedding"]))(images)
    np.testing.assert_allclose(jax.jit(lambda: grad(remat))(), grad(backbone.module), rtol=1e-4, atol=1e-6)


def test_bad_fraction_raises_clearly():
    backbone = bb.create("dinov2", "test")
    images = _images(1)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"keep fraction must be in \(0, 1\]"):
            _apply(backbone, images, (KEY, bad))
    with pytest.raises(TypeError, match="must be a Python float"):
        jax.jit(lambda f: _apply(backbone, images, (KEY, f)))(0.5)


@pytest.mark.slow
def test_larger_image_and_bfloat16():
    backbone = bb.create("dinov2", "test", dtype=jnp.bfloat16)
    images = jax.random.uniform(KEY, (2, 48, 48, 3))
    out = backbone.module.apply({"params": backbone.params}, images, token_keep=(KEY, 0.25))
    assert out["last_hidden_state"].shape == (2, 1 + 9, backbone.config.width)  # round(0.25 * 36) = 9
    assert out["embedding"].dtype == jnp.float32 and np.all(np.isfinite(out["embedding"]))
