"""Tests for jdd.augment: shapes, identities, parity with torch resampling, randomness, gradients."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jdd import augment as A

KEY = jax.random.PRNGKey(0)
ALL_OPS = sorted(A.OPS)


@functools.lru_cache(maxsize=None)
def _jitted(fn, items):
    return jax.jit(functools.partial(fn, **dict(items)))


def _aug(key, images, **kwargs):
    """`A.augment` under jit, compiled once per option set (op-by-op dispatch is slow on CPU)."""
    return np.asarray(_jitted(A.augment, tuple(sorted(kwargs.items())))(key, images))


def _images(b=4, h=16, w=16, seed=1):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(b, h, w, 3)), jnp.float32)


def _to_torch(x):  # NHWC jax -> NCHW float64 torch
    return torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2)


def test_default_chain_shape_and_noise_leaves_range():
    x = _images()
    y = _aug(KEY, x, out_res=12, noise_p=1.0)
    assert y.shape == (4, 12, 12, 3) and y.dtype == x.dtype
    # LGM-style noise is not clipped: with noise on every image some pixels leave [0, 1].
    assert float(y.min()) < 0.0 and float(y.max()) > 1.0


@pytest.mark.parametrize("op", ["flip", "rrc", "crop", "cutout", "scale", "rotate"])
def test_geometric_ops_stay_in_range(op):
    # Convex combinations of pixels and zero fill cannot leave [0, 1].
    y = _aug(KEY, _images(), ops=op)
    assert y.shape == (4, 16, 16, 3)
    assert float(y.min()) >= -1e-6 and float(y.max()) <= 1 + 1e-6


def test_flip_twice_with_same_key_is_identity():
    x = _images(b=8)
    once = _aug(KEY, x, ops="flip")
    np.testing.assert_array_equal(_aug(KEY, once, ops="flip"), x)
    # Each sample is either untouched or mirrored, and with 8 samples both happen for this key.
    x = np.asarray(x)
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(once, x)]
    same = [np.array_equal(o, i) for o, i in zip(once, x)]
    assert all(m != s for m, s in zip(mirrored, same)) and any(mirrored) and any(same)


def test_rrc_full_box_is_identity_or_resize():
    x = _images()
    y = _aug(KEY, x, ops="rrc", rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0))
    np.testing.assert_allclose(y, x, atol=1e-6)
    y8 = _aug(KEY, x, ops="rrc", out_res=8, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0))
    ref = F.interpolate(_to_torch(x), size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    np.testing.assert_allclose(y8, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_noise_std_zero_is_identity():
    x = _images()
    np.testing.assert_array_equal(_aug(KEY, x, ops="noise", noise_std=0.0, noise_p=1.0), x)


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("box,out", [((3, 5, 10, 7), (16, 16)), ((0, 0, 16, 16), (5, 7)),
                                     ((2, 1, 13, 9), (6, 6)), ((4, 4, 3, 12), (12, 12))])
def test_resized_crop_matches_torch_interpolate(box, out, antialias):
    x = _images(b=1, h=16, w=16)
    top, left, h, w = box
    y = A.resized_crop(x[0], jnp.int32(top), jnp.int32(left), jnp.int32(h), jnp.int32(w), out,
                       antialias=antialias)
    crop = _to_torch(x)[:, :, top:top + h, left:left + w]
    ref = F.interpolate(crop, size=out, mode="bilinear", antialias=antialias, align_corners=False)
    np.testing.assert_allclose(y, ref[0].permute(1, 2, 0).numpy(), atol=2e-5)


def test_rrc_box_is_torchvision_like():
    keys = jax.random.split(KEY, 2000)
    boxes = jax.jit(jax.vmap(lambda k: jnp.stack(A.rrc_box(k, 24, 32, (0.08, 1.0), (3 / 4, 4 / 3)))))(keys)
    top, left, h, w = np.asarray(boxes).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 24).all() and (left + w <= 32).all()
    area = h * w / (24 * 32)
    # Rounding w and h to integers moves the area a little outside the sampled range.
    assert area.min() > 0.08 * 0.8 and area.max() <= 1.0
    aspect = w / h
    assert aspect.min() > 0.75 * 0.85 and aspect.max() < 4 / 3 / 0.85
    # Positions are spread over the valid range (not always the centre or the corner).
    assert len(set(top.tolist())) > 10 and len(set(left.tolist())) > 10


def test_rrc_box_falls_back_to_centre_crop():
    # No candidate can fit (area > image), so torchvision takes the centre crop with ratio clamped.
    top, left, h, w = A.rrc_box(KEY, 16, 32, scale=(2.0, 3.0), ratio=(1.0, 1.0))
    assert (int(top), int(left), int(h), int(w)) == (0, 8, 16, 16)
    top, left, h, w = A.rrc_box(KEY, 16, 16, scale=(2.0, 3.0), ratio=(3 / 4, 4 / 3))
    assert (int(top), int(left), int(h), int(w)) == (0, 0, 16, 16)


def test_per_sample_independence_and_determinism():
    x = jnp.tile(_images(b=1), (6, 1, 1, 1))  # six identical images
    y = _aug(KEY, x, ops="rrc")
    assert len({np.asarray(s).tobytes() for s in y}) == 6  # every sample got its own crop
    np.testing.assert_array_equal(y, _aug(KEY, x, ops="rrc"))
    assert not np.allclose(y, _aug(jax.random.PRNGKey(1), x, ops="rrc"))


def test_augment_copies_order_and_independence():
    x = _images(b=3)
    y = np.asarray(_jitted(A.augment_copies, (("copies", 4), ("ops", "flip")))(KEY, x))
    x = np.asarray(x)
    assert y.shape == (12, 16, 16, 3)
    for c, i in itertools.product(range(4), range(3)):  # row c*B+i is a flip (or not) of image i
        row = y[c * 3 + i]
        assert np.array_equal(row, x[i]) or np.array_equal(row, x[i][:, ::-1])
    z = _jitted(A.augment_copies, (("copies", 2), ("ops", "rrc"), ("out_res", 8)))(
        KEY, jnp.tile(x[:1], (3, 1, 1, 1)))
    assert len({np.asarray(s).tobytes() for s in z}) == 6


@pytest.mark.parametrize("op", ALL_OPS)
def test_gradients_finite_and_nonzero_under_jit(op):
    x = _images(b=2)
    weights = np.random.default_rng(3).standard_normal((2, 16, 16, 3), np.float32)

    @jax.jit
    def loss(images):
        return jnp.sum(weights * A.augment(jax.random.PRNGKey(5), images, ops=op))

    g = jax.grad(loss)(x)
    assert g.shape == x.shape and bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0


@pytest.mark.slow
def test_jit_and_vmap_match_eager():
    x = _images(b=2)
    fn = lambda k, im: A.augment(k, im, ops=("flip", "rrc", "noise"), out_res=8)  # noqa: E731
    np.testing.assert_allclose(jax.jit(fn)(KEY, x), fn(KEY, x), atol=1e-6)
    keys = jax.random.split(KEY, 3)
    stacked = jax.jit(jax.vmap(fn, in_axes=(0, None)))(keys, x)
    assert stacked.shape == (3, 2, 8, 8, 3)
    np.testing.assert_allclose(stacked[1], jax.jit(fn)(keys[1], x), atol=1e-6)


def test_bad_op_name_and_stray_option_fail_before_compile():
    with pytest.raises(ValueError, match="known ops"):
        jax.jit(lambda x: A.augment(KEY, x, ops=("flip", "flop")))(_images())
    with pytest.raises(ValueError, match="ratio_rotate"):
        A.augment(KEY, _images(), ops="flip", ratio_rotate=10.0)


def test_affine_sample_matches_torch_grid_sample():
    x = _images(b=1, h=12, w=16)
    for theta in (np.diag([0.9, 1.15]), np.array([[np.cos(0.2), np.sin(0.2)], [-np.sin(0.2), np.cos(0.2)]])):
        y = A.affine_sample(x[0], jnp.asarray(theta, jnp.float32))
        t = torch.zeros(1, 2, 3, dtype=torch.float64)
        t[0, :, :2] = torch.from_numpy(theta)
        grid = F.affine_grid(t, (1, 3, 12, 16), align_corners=True)
        ref = F.grid_sample(_to_torch(x), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        np.testing.assert_allclose(y, ref[0].permute(1, 2, 0).numpy(), atol=1e-5)


def test_dsa_crop_is_a_zero_filled_integer_shift():
    x = _images(b=1)[0]
    for k in jax.random.split(KEY, 5):
        y = np.asarray(A.OPS["crop"](k, x))
        padded = np.pad(np.asarray(x), ((2, 2), (2, 2), (0, 0)))  # int(16 * 0.125 + 0.5) = 2
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                  if np.array_equal(y, padded[2 + dy:18 + dy, 2 + dx:18 + dx])]
        assert len(shifts) == 1


def test_dsa_cutout_zeroes_one_clipped_square():
    ones = jnp.ones((16, 16, 3))
    sides = set()
    for k in jax.random.split(KEY, 40):
        zero = np.asarray(A.OPS["cutout"](k, ones))[..., 0] == 0
        rows, cols = np.nonzero(zero)
        box = np.zeros_like(zero)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert np.array_equal(zero, box)  # a single axis-aligned rectangle
        assert rows.max() - rows.min() + 1 <= 8 and cols.max() - cols.min() + 1 <= 8
        sides.add((rows.max() - rows.min() + 1, cols.max() - cols.min() + 1))
    assert (8, 8) in sides  # unclipped squares have side int(16 * 0.5 + 0.5) = 8


def _one_factor(a, b):
    """The f of a = f * b (least squares) and the largest residual |a - f b|: an element-wise ratio
    a / b would amplify float32 rounding wherever b is near zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    f = float((a * b).sum() / (b * b).sum())
    return f, float(np.abs(a - f * b).max())


def test_dsa_colour_ops_closed_forms():
    x = _images(b=1)[0]
    shift = A.OPS["brightness"](KEY, x) - x
    assert float(jnp.ptp(shift)) < 1e-6 and abs(float(shift[0, 0, 0])) <= 0.5
    sat = A.OPS["saturation"](KEY, x)
    np.testing.assert_allclose(sat.mean(-1), x.mean(-1), atol=1e-6)  # per-pixel grey level kept
    factor, resid = _one_factor(sat - sat.mean(-1, keepdims=True), x - x.mean(-1, keepdims=True))
    assert resid < 1e-5 and 0 <= factor <= 2.0 and abs(factor - 1) > 1e-3  # one factor, not the identity
    con = A.OPS["contrast"](KEY, x)
    np.testing.assert_allclose(con.mean(), x.mean(), atol=1e-6)  # global mean kept
    factor, resid = _one_factor(con - con.mean(), x - x.mean())
    assert resid < 1e-5 and 0.5 <= factor <= 1.5 and abs(factor - 1) > 1e-3


def test_dsa_scale_and_rotate_keep_the_centre():
    # An odd-sized image's centre pixel maps to itself under any linear map about the centre.
    x = _images(b=1, h=15, w=15)[0]
    for op in ("scale", "rotate"):
        y = A.OPS[op](KEY, x)
        np.testing.assert_allclose(y[7, 7], x[7, 7], atol=1e-5)
