"""jdd.backbones: variant table, random init, errors, gradients, bfloat16, position resampling."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdd.backbones as bb
from jdd.backbones import convert, families, posemb, vit

FAMILY_NAMES = sorted(bb.FAMILIES)
# Families loaded from Hugging Face checkpoints; the timm ones are checked against timm in test_backbones_timm.py.
HF_FAMILY_NAMES = sorted(name for name, family in bb.FAMILIES.items() if family.model_types)


def _images(size, batch=2, seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), (batch, size, size, 3))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_create_test_variant(family):
    backbone = bb.create(family, bb.TEST_VARIANT)
    assert (backbone.patch_size, backbone.image_size, backbone.embed_dim) == (8, 32, 32)
    cfg = backbone.config
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim) == (32, 2, 2, 64)
    leaves = jax.tree_util.tree_leaves(backbone.params)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert isinstance(backbone.params, dict) and all(isinstance(v, (dict, jax.Array)) for v in backbone.params.values())
    apply = jax.jit(backbone.apply)
    for size in (32, 16):
        # images of different brightness: their embeddings must differ
        features = apply(backbone.params, _images(size, batch=3) * jnp.array([1.0, 0.6, 0.2])[:, None, None, None])
        tokens = (size // 8) ** 2 + int(cfg.class_token) + cfg.num_registers
        assert features["embedding"].shape == (3, 32)
        assert features["patch_mean"].shape == (3, 32)
        assert features["last_hidden_state"].shape == (3, tokens, 32)
        assert ("cls" in features) == cfg.class_token
        assert all(np.isfinite(np.asarray(v)).all() for v in features.values())
        # different images give different embeddings (the random backbone is not degenerate)
        emb = np.asarray(features["embedding"])
        assert np.abs(emb[0] - emb[2]).max() > 1e-2 * np.abs(emb).max()


def test_create_is_deterministic_in_the_seed():
    a, b, c = (bb.create("dinov2", "test", seed=s) for s in (0, 0, 1))
    same = jax.tree_util.tree_map(lambda x, y: bool(jnp.all(x == y)), a.params, b.params)
    assert all(jax.tree_util.tree_leaves(same))
    assert not np.allclose(a.params["patch_kernel"], c.params["patch_kernel"])


def test_create_errors():
    with pytest.raises(ValueError, match="unknown backbone family 'vgg'"):
        bb.create("vgg", "test")
    with pytest.raises(ValueError, match=r"unknown dinov2 variant 'H/14'.*S/14"):
        bb.create("dinov2", "H/14")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        bb.create("dinov2", "test", dtype=jnp.float16)
    with pytest.raises(ValueError, match=r"image size 230 .*patch size 14 of dinov2 S/14.*224 or 238"):
        bb.create("dinov2", "S/14", image_size=230)
    assert bb.create("dinov2", "test", image_size=48).image_size == 48


def _hf_config(family: str, variant: str) -> dict:
    """The HF config.json dict of a variant, written the way the hub's checkpoints spell it."""
    cfg = bb.FAMILIES[family].config(variant)
    sizes = dict(hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                 patch_size=cfg.patch_size, image_size=cfg.image_size)
    if family in ("dinov2", "dinov2_registers"):
        swiglu = cfg.act == vit.SWIGLU
        return dict(sizes, model_type={"dinov2": "dinov2", "dinov2_registers": "dinov2_with_registers"}[family],
                    mlp_ratio=4, use_swiglu_ffn=swiglu)
    if family == "dino":
        return dict(sizes, model_type="vit", intermediate_size=cfg.mlp_dim, layer_norm_eps=1e-6)
    if family == "clip":
        return dict(model_type="clip", projection_dim=cfg.projection_dim,
                    vision_config=dict(sizes, intermediate_size=cfg.mlp_dim))
    return dict(model_type="siglip", vision_config=dict(sizes, intermediate_size=cfg.mlp_dim))


@pytest.mark.slow
@pytest.mark.parametrize("family", HF_FAMILY_NAMES)
def test_variant_table_matches_transformers(family):
    """Each named variant has the architecture (config and parameter count) of its HF model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model_class = {"dinov2": "Dinov2Model", "dinov2_registers": "Dinov2WithRegistersModel", "dino": "ViTModel",
                   "clip": "CLIPVisionModelWithProjection", "siglip": "SiglipVisionModel"}[family]
    for variant in bb.variants(family):
        if variant == bb.TEST_VARIANT:
            continue
        config = _hf_config(family, variant)
        assert families.family_of_config(config).name == family
        ours = bb.FAMILIES[family].config(variant)
        parsed = bb.FAMILIES[family].from_hf(config)
        # same architecture whichever way it is built (DINO's eps comes from the config)
        assert parsed == ours, (variant, parsed, ours)
        hf_config = transformers.AutoConfig.for_model(**config)
        if family in ("clip", "siglip"):
            vision = hf_config.vision_config
            vision.projection_dim = config.get("projection_dim", 0)
            hf_config = vision
        with torch.device("meta"):
            model = getattr(transformers, model_class)(hf_config)
        unused = ("mask_token", "pooler.")  # tensors our converters deliberately drop
        hf_count = sum(p.numel() for n, p in model.named_parameters() if not any(u in n for u in unused))
        our_count = sum(int(np.prod(s)) for s in bb.param_shapes(ours).values())
        assert our_count == hf_count, (variant, our_count, hf_count)


def test_check_image_size():
    backbone = bb.create("dinov2", "test")
    bb.check_image_size(backbone, 24)
    with pytest.raises(ValueError, match=r"image size 30 .*patch size 8.*24 or 32"):
        bb.check_image_size(backbone, 30)
    with pytest.raises(ValueError, match=r"image size 5 .*nearest valid sizes: 8"):
        bb.check_image_size(backbone, 5)
    # under jit the check runs at trace time, before anything is compiled
    with pytest.raises(ValueError, match="image size 30"):
        jax.jit(backbone.apply)(backbone.params, jnp.zeros((1, 30, 32, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        backbone.apply(backbone.params, jnp.zeros((1, 3, 32, 32)))


@pytest.mark.parametrize("family", ["dinov2", "clip", "siglip"])
def test_grad_wrt_images(family):
    backbone = bb.create(family, "test")

    @jax.jit
    def grad(images):
        return jax.grad(lambda x: jnp.sum(backbone.apply(backbone.params, x)["embedding"] ** 2))(images)

    g = np.asarray(grad(_images(24)))
    assert g.shape == (2, 24, 24, 3)
    assert np.isfinite(g).all() and np.abs(g).max() > 0


def test_bfloat16_compute_is_close_to_float32():
    f32 = bb.create("dinov2", "test", seed=3)
    b16 = bb.create("dinov2", "test", seed=3, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(b16.params))
    images = _images(32, batch=4)
    ref = f32.apply(f32.params, images)
    out = jax.jit(b16.apply)(b16.params, images)
    for key in ("embedding", "last_hidden_state", "patch_mean"):
        assert out[key].dtype == jnp.float32
        err = np.abs(np.asarray(out[key]) - np.asarray(ref[key])).max() / np.abs(np.asarray(ref[key])).max()
        assert 0 < err < 5e-2, (key, err)


def _save(path, config: dict, tensors: dict):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))


def _tiny_dinov2_checkpoint() -> tuple[dict, dict]:
    """(config.json dict, tensors) of a tiny random DINOv2 written by transformers' save_pretrained."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=8, image_size=32))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return json.loads(pathlib.Path(tmp, "config.json").read_text()), load_file(f"{tmp}/model.safetensors")


def test_strict_conversion_errors(tmp_path):
    config, tensors = _tiny_dinov2_checkpoint()
    _save(tmp_path / "ok", config, tensors)
    backbone = bb.load(str(tmp_path / "ok"))
    assert backbone.apply(backbone.params, _images(16))["embedding"].shape == (2, 32)

    broken = dict(tensors)
    del broken["encoder.layer.0.mlp.fc2.bias"]
    broken["encoder.layer.0.mlp.fc3.weight"] = np.zeros((3, 3), np.float32)
    broken["embeddings.position_embeddings"] = np.zeros((1, 10, 32), np.float32)
    _save(tmp_path / "broken", config, broken)
    with pytest.raises(bb.ConversionError) as err:
        bb.load(str(tmp_path / "broken"))
    message = str(err.value)
    assert "3 problems" in message
    assert "missing checkpoint tensor 'encoder.layer.0.mlp.fc2.bias'" in message
    assert "unused checkpoint tensor 'encoder.layer.0.mlp.fc3.weight'" in message
    assert "shape mismatch: 'embeddings.position_embeddings' (1, 10, 32)" in message


def test_convert_reports_unfilled_parameters():
    shapes = {("a", "kernel"): (2, 3), ("b",): (4,)}
    rules = convert.linear("lin", ("a",), bias=False)
    with pytest.raises(bb.ConversionError, match="parameter b is not filled"):
        convert.convert({"lin.weight": np.zeros((3, 2), np.float32)}, rules, shapes)
    params = convert.convert({"lin.weight": np.arange(6, dtype=np.float32).reshape(3, 2), "x": np.zeros(1)},
                             rules, {("a", "kernel"): (2, 3)}, ignored=[r"^x$"])
    np.testing.assert_array_equal(params["a"]["kernel"], np.arange(6).reshape(3, 2).T)


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bb.load(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        bb.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(ValueError, match=r"model_type 'resnet'.*supported model types"):
        bb.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(FileNotFoundError, match="has no weights"):
        bb.load(str(tmp_path))
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network in tests
    with pytest.raises(OSError, match=r"could not fetch backbone 'jdd-tests/no-such-model'.*pass its path"):
        bb.load("jdd-tests/no-such-model")


def test_pickle_checkpoint_and_no_torch_import_for_safetensors(tmp_path):
    """A pytorch_model.bin loads like its safetensors twin; safetensors loading never imports torch."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=64, patch_size=8, image_size=32))
    model.save_pretrained(tmp_path / "st")
    # transformers 5 writes safetensors only; a hub-style pickle holds the same (on-disk) names
    from safetensors.torch import load_file

    (tmp_path / "bin").mkdir()
    torch.save(load_file(tmp_path / "st" / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    a, b = bb.load(str(tmp_path / "st")), bb.load(str(tmp_path / "bin"))
    same = jax.tree_util.tree_map(lambda x, y: bool(np.array_equal(x, y)), a.params, b.params)
    assert all(jax.tree_util.tree_leaves(same))
    code = ("import sys, jdd.backbones as bb; b = bb.load(sys.argv[1]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported torch'")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "st")], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_preprocessor_config_sets_normalisation(tmp_path):
    config, tensors = _tiny_dinov2_checkpoint()
    _save(tmp_path, config, tensors)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    backbone = bb.load(str(tmp_path))
    assert backbone.config.mean == (0.5, 0.5, 0.5) and backbone.config.std == (0.25, 0.25, 0.25)


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matrix_matches_torch_interpolate(antialias):
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(0).standard_normal((1, 1, 37, 37))
    for out in (1, 8, 16, 23, 37, 40, 64):
        ref = torch.nn.functional.interpolate(torch.from_numpy(grid), size=(out, out), mode="bicubic",
                                              align_corners=False, antialias=antialias)[0, 0].numpy()
        m = posemb.bicubic_matrix(37, out, antialias)
        np.testing.assert_allclose(m @ grid[0, 0] @ m.T, ref, atol=1e-10)


def test_resample_grid_identity_and_shape():
    pos = jax.random.normal(jax.random.PRNGKey(0), (16, 5))
    assert posemb.resample_grid(pos, (4, 4)) is pos
    assert posemb.resample_grid(pos, (2, 6)).shape == (12, 5)
    with pytest.raises(ValueError, match="square"):
        posemb.resample_grid(pos[:15], (2, 2))


@pytest.mark.parametrize("budget_samples", [1, 4])
def test_chunked_attention_matches_one_piece(monkeypatch, budget_samples):
    """The cache-sized batch chunks of CPU attention give the same values and gradients."""
    batch, tokens, heads, head_dim = 6, 5, 2, 4
    monkeypatch.setattr(vit, "CPU_ATTENTION_CHUNK_BYTES", budget_samples * heads * tokens * tokens * 4)
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (batch, tokens, heads, head_dim)) for i in range(3))
    np.testing.assert_allclose(vit.attention(q, k, v), vit.dense_attention(q, k, v), rtol=1e-6, atol=1e-6)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))  # noqa: E731
    chunked = jax.jit(jax.grad(loss(vit.attention), argnums=(0, 1, 2)))(q, k, v)
    whole = jax.grad(loss(vit.dense_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(chunked, whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the chunk is the largest divisor of the batch within the budget: 6 -> 1 or 3
    assert vit.largest_divisor_at_most(batch, budget_samples) == {1: 1, 4: 3}[budget_samples]


@pytest.mark.slow
def test_remat_gives_the_same_gradient_with_less_memory():
    """ViT(remat=True): identical features and input gradient, smaller temporaries in the backward."""
    # 64 tokens x 64 images x 8 blocks: stored activations dominate the backward's temporaries (at
    # 16 tokens x 16 images they no longer do, since the erf GELU stores less).
    small = bb.create("dinov2", "test", image_size=64)
    cfg = dataclasses.replace(small.config, depth=8)
    backbone = dataclasses.replace(small, module=vit.ViT(cfg), params=bb.random_params(cfg))
    remat = dataclasses.replace(backbone, module=backbone.module.clone(remat=True))
    x = jax.random.uniform(jax.random.PRNGKey(0), (64, 64, 64, 3))

    def grad_fn(b):
        return jax.jit(jax.grad(lambda im: jnp.sum(b.apply(b.params, im)["embedding"] ** 2)))

    np.testing.assert_allclose(remat.apply(remat.params, x)["embedding"],
                               backbone.apply(backbone.params, x)["embedding"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_fn(remat)(x), grad_fn(backbone)(x), rtol=1e-5, atol=1e-7)
    temp = lambda b: grad_fn(b).lower(x).compile().memory_analysis().temp_size_in_bytes  # noqa: E731
    assert temp(remat) < 0.85 * temp(backbone)  # measured 0.74 here (0.97 for DINOv2-S, 20 x 112 px, on CPU)
