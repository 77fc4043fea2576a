"""Tests for jdd.synsets: LGM-parity decode, real-image inverse, growth schedule and invariance."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jdd import synsets as S

KEY = jax.random.PRNGKey(0)
KINDS = sorted(S.PARAMETRISATIONS)


@functools.lru_cache(maxsize=None)
def _jit_decode(kind, res, decorrelate=True):
    return jax.jit(functools.partial(S.decode, kind, res=res, decorrelate=decorrelate))


def _decode(kind, params, *, res, decorrelate=True):
    """`S.decode` under jit, compiled once per (kind, res, option) and level structure."""
    return _jit_decode(kind, res, decorrelate)(params)


def _real_like(m=3, res=12, seed=1):
    x = np.random.default_rng(seed).uniform(size=(m, res, res, 3)).astype(np.float32)
    x[0, 0, 0], x[0, 0, 1] = 0.0, 1.0  # exact 0 and 1 must survive the inverse
    return jnp.asarray(x)


def _lgm_decode_torch(levels, res, decorrelate=True):
    """LGM's PyramidDataset.decode_pyramid in float64 torch, from NHWC levels."""
    total = sum(F.interpolate(torch.from_numpy(np.asarray(l, np.float64)).permute(0, 3, 1, 2), (res, res),
                              mode="bilinear", antialias=False, align_corners=False) for l in levels)
    flat = total.permute(0, 2, 3, 1)
    if decorrelate:
        c = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float64)
        flat = flat @ (c / torch.linalg.norm(c, dim=0).max()).T
    return torch.sigmoid(2 * flat).numpy()


def test_level_resolutions_follow_lgm():
    assert S.level_resolutions(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert S.level_resolutions(224) == [1, 2, 4, 8, 16, 32, 64, 128, 224]
    assert S.level_resolutions(112) == [1, 2, 4, 8, 16, 32, 64, 112]
    assert S.level_resolutions(1) == [1]


@pytest.mark.parametrize("res,extent", [(224, 200), (12, 3), (7, 1)])
def test_num_levels_matches_lgm_upkeep_loop(res, extent):
    # LGM: for step in range(iterations + 1): upkeep(step) extends when (step - 1) % extent == 0 and step > 1,
    # until the finest level reaches res.
    count, max_levels = 1, len(S.level_resolutions(res))
    for step in range(0, extent * (max_levels + 2) + 3):
        if (step - 1) % extent == 0 and step > 1 and count < max_levels:
            count += 1
        assert S.num_levels(step, res=res, extent=extent) == count, step


def test_color_matrix_is_normalised_lucid():
    c = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    np.testing.assert_allclose(S.COLOR_MATRIX * np.linalg.norm(c, axis=0).max(), c, rtol=1e-12)
    assert np.isclose(np.linalg.norm(S.COLOR_MATRIX, axis=0).max(), 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_shape_range_and_jit(kind):
    params = S.init(kind, KEY, num_images=3, res=12, **({"levels": 4} if kind == "pyramid" else {}))
    images = S.decode(kind, params, res=12)  # eager, compared with jit below
    assert images.shape == (3, 12, 12, 3) and images.dtype == jnp.float32
    assert float(images.min()) > 0.0 and float(images.max()) < 1.0 and float(images.std()) > 0.01
    jitted = _decode(kind, params, res=12)
    np.testing.assert_allclose(jitted, images, atol=1e-6)


def test_pyramid_decode_matches_lgm_reference():
    for res, levels in ((12, 5), (7, 4)):
        params = S.init("pyramid", KEY, num_images=2, res=res, levels=levels)
        # Perturb levels so that they are not a single noise scale.
        params = jax.tree.map(lambda l: l + 0.3 * jnp.sin(7 * l), params)
        for decorrelate in (True, False):
            ours = _decode("pyramid", params, res=res, decorrelate=decorrelate)
            np.testing.assert_allclose(ours, _lgm_decode_torch(params["levels"], res, decorrelate), atol=2e-6)


def test_pixels_decode_matches_numpy():
    params = S.init("pixels", KEY, num_images=2, res=5)
    z = np.asarray(params["pixels"], np.float64)
    ref = 1 / (1 + np.exp(-2 * z @ S.COLOR_MATRIX.T))
    np.testing.assert_allclose(_decode("pixels", params, res=5), ref, atol=1e-6)
    assert abs(float(params["pixels"].std()) - 1.0) < 0.2  # LGM's N(0, 1) init


def test_noise_init_scale_follows_lgm():
    params = S.init("pyramid", KEY, num_images=64, res=16, levels=3)
    assert [l.shape[1] for l in params["levels"]] == [1, 2, 4]
    stds = [float(l.std()) for l in params["levels"]]
    assert all(abs(s - 1 / 3) < 0.06 for s in stds), stds  # N(0, 1) / number of levels
    assert len(S.init("pyramid", KEY, num_images=2, res=16)["levels"]) == S.num_levels(0, res=16, extent=5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("res", [12, 7])
def test_real_image_init_round_trip(kind, res):
    images = _real_like(res=res)
    for decorrelate in (True, False):
        params = S.init(kind, KEY, num_images=3, res=res, init_images=images, decorrelate=decorrelate)
        back = _decode(kind, params, res=res, decorrelate=decorrelate)
        np.testing.assert_allclose(back, jnp.clip(images, 1e-3, 1 - 1e-3), atol=2e-6)
    if kind == "pyramid":  # all levels built, and the coarse ones carry the coarse content
        assert [l.shape[1] for l in params["levels"]] == S.level_resolutions(res)
        assert float(jnp.abs(params["levels"][0]).max()) > 0.05


@pytest.mark.parametrize("res", [12, 7])
def test_grow_keeps_decoded_image_exactly(res):
    extent = 3
    params = S.init("pyramid", KEY, num_images=2, res=res)
    sizes = S.level_resolutions(res)
    rng = np.random.default_rng(0)
    for step in range(0, extent * len(sizes) + 4):
        before = _decode("pyramid", params, res=res)
        grown, changed = S.grow("pyramid", params, step=step, res=res, extent=extent)
        assert changed == (len(grown["levels"]) > len(params["levels"]))
        assert len(grown["levels"]) == S.num_levels(step, res=res, extent=extent)
        np.testing.assert_allclose(_decode("pyramid", grown, res=res), before, rtol=1e-6, atol=0)
        if not changed:
            assert grown is params
        # A stand-in for optimisation between growths, so levels are not all zero or noise.
        params = jax.tree.map(lambda l: l + 0.1 * rng.standard_normal(l.shape, np.float32), grown)
    assert [l.shape[1] for l in params["levels"]] == sizes


def test_grow_catches_up_several_levels_when_resuming():
    params = S.init("pyramid", KEY, num_images=1, res=16)
    grown, changed = S.grow("pyramid", params, step=3 * 10 + 1, res=16, extent=10)
    assert changed and [l.shape[1] for l in grown["levels"]] == [1, 2, 4, 8]


def test_grow_lgm_mode_rescales_and_adds_noise():
    params = S.init("pyramid", KEY, num_images=256, res=8, levels=2)
    with pytest.raises(ValueError, match="key"):
        S.grow("pyramid", params, step=21, res=8, extent=10, mode="lgm")
    grown, changed = S.grow("pyramid", params, step=21, res=8, extent=10, mode="lgm", key=KEY)
    assert changed and len(grown["levels"]) == 3
    for old, new in zip(params["levels"], grown["levels"]):
        np.testing.assert_allclose(new, old * 2 / 3, rtol=1e-6)
    assert abs(float(grown["levels"][2].std()) - 1 / 3) < 0.02


def test_pixels_never_grow():
    params = S.init("pixels", KEY, num_images=1, res=4)
    assert S.grow("pixels", params, step=10_000, res=4, extent=1) == (params, False)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter_under_jit(kind):
    params = S.init(kind, KEY, num_images=2, res=8, **({"levels": 4} if kind == "pyramid" else {}))
    weights = np.random.default_rng(2).standard_normal((2, 8, 8, 3), np.float32)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(weights * S.decode(kind, p, res=8))))(params)
    for g in jax.tree.leaves(grads):
        assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).min()) > 0


def test_upsample_matches_torch_bilinear():
    for r, res in ((1, 12), (2, 12), (4, 7), (8, 12), (3, 16)):
        level = np.random.default_rng(r).standard_normal((1, r, r, 3), np.float32)
        ref = F.interpolate(torch.from_numpy(np.asarray(level, np.float64)).permute(0, 3, 1, 2), (res, res),
                            mode="bilinear", align_corners=False)
        np.testing.assert_allclose(S._upsample(level, res), ref.permute(0, 2, 3, 1).numpy(), atol=3e-6)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="known"):
        S.init("voxels", KEY, num_images=1, res=4)
    with pytest.raises(ValueError, match="shape"):
        S.init("pixels", KEY, num_images=2, res=4, init_images=jnp.zeros((2, 5, 5, 3)))
    with pytest.raises(ValueError, match="prefix"):
        S.decode("pyramid", S.init("pyramid", KEY, num_images=1, res=8, levels=4), res=6)
    with pytest.raises(ValueError, match="mode"):
        S.grow("pyramid", S.init("pyramid", KEY, num_images=1, res=8), step=5, res=8, extent=1, mode="x")
    with pytest.raises(ValueError, match="extent"):
        S.num_levels(3, res=8, extent=0)
