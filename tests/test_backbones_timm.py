"""jdd.backbones with timm checkpoints: EVA-02 and plain timm ViTs (DeiT, MAE, MoCo-v3).

Parity: each timm model is built from a tiny random config (passed as timm `model_args`, which
`save_for_hf` records in config.json), every parameter perturbed with noise, saved as timm saves
hub checkpoints, loaded with jdd.backbones.load, and compared in float32 with timm's own features
at the native size and at another one (timm rebuilt at that size from the saved checkpoint, which
resamples its position embeddings and rotary tables). timm comes from PyPI; see tests/_timm_shim.py
for why torchvision may be a stub here.
"""
import json
import os
import subprocess
import sys

import _timm_shim
from _parity import perturbed, rel_diff
from conftest import IN_CI, skip_unless_ci
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdd.backbones as bb
from jdd.backbones import timm_families

timm, TIMM_MISSING = _timm_shim.import_timm()
# Locally a missing timm skips; in CI (which installs it) the tests run and fail loudly without it.
needs_timm = pytest.mark.skipif(timm is None and not IN_CI, reason=str(TIMM_MISSING))

RTOL = 1e-4
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
OTHER_SIZE = 48

# name -> (timm architecture, model_args beyond TINY); together they cover every conversion branch.
CASES = {
    # EVA-02 B/L layout: separate q/k/v (no key bias), SwiGLU with the sub-layernorm, rotary
    # embeddings on a 16 x 16 reference grid, average pooling + fc_norm
    "eva02_base": ("eva02_base_patch14_224", {}),
    # EVA-02 S layout: fused q/k/v with q and v biases apart, packed SwiGLU without sub-layernorm
    "eva02_small": ("eva02_small_patch14_224", {}),
    # EVA options: attention sub-layernorm, layer scale, class-token pooling after a final norm,
    # rotary positions without a reference grid
    "eva02_options": ("eva02_small_patch14_224", dict(scale_attn_inner=True, init_values=0.5, global_pool="token",
                                                       ref_feat_shape=None)),
    # the timm ViT layout of MoCo-v3, MAE and DeiT: class token after the final norm
    "vit": ("vit_base_patch16_224", {}),
    # ViT options: average pooling + fc_norm, no position embedding for the class token (DeiT-3),
    # layer scale, no q/k/v bias
    "vit_options": ("vit_base_patch16_224", dict(global_pool="avg", no_embed_class=True, init_values=0.5,
                                                 qkv_bias=False)),
}


def timm_features(model, images: np.ndarray, mean, std) -> dict:
    """timm's features of NHWC images in [0, 1], normalised with the checkpoint's mean/std."""
    import torch

    pixels = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
        out = {"last_hidden_state": tokens, "embedding": model.forward_head(tokens, pre_logits=True)}
        if model.cls_token is not None:  # the class token after the final norm, wherever timm has it
            out["cls"] = model.fc_norm(tokens[:, 0]) if model.global_pool == "avg" else tokens[:, 0]
    return {k: v.numpy() for k, v in out.items()}


def save_timm(path, architecture: str, **model_args):
    """A perturbed random timm model saved as a hub-style checkpoint directory; returns the model."""
    from timm.models import save_for_hf

    model = perturbed(timm.create_model(architecture, pretrained=False, **model_args))
    save_for_hf(model, str(path), safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """(case name, perturbed timm model, its checkpoint directory)."""
    if timm is None:
        skip_unless_ci(str(TIMM_MISSING))
    architecture, extra = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return request.param, save_timm(path, architecture, **TINY, **extra), path


@needs_timm
def test_parity_with_timm(saved):
    name, model, path = saved
    backbone = bb.load(str(path))
    assert backbone.family == ("eva02" if name.startswith("eva02") else "timm_vit")
    assert (backbone.image_size, backbone.patch_size, backbone.embed_dim) == (32, 8, 32)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    assert (backbone.config.mean, backbone.config.std) == (tuple(mean), tuple(std))
    apply = jax.jit(backbone.apply)
    for size in (32, OTHER_SIZE):
        reference = model if size == 32 else timm.create_model(f"local-dir:{path}", pretrained=True,
                                                               img_size=size).eval()
        images = np.random.default_rng(size).random((2, size, size, 3), dtype=np.float32)
        ours, ref = apply(backbone.params, images), timm_features(reference, images, mean, std)
        assert set(ref) <= set(ours)
        for key, value in ref.items():
            assert ours[key].shape == value.shape, (key, size)
            assert rel_diff(ours[key], value) <= RTOL, (name, key, size, rel_diff(ours[key], value))
        if backbone.config.pool == "patch_mean":
            np.testing.assert_array_equal(ours["embedding"], ours["patch_mean"])
    # torchvision stood in by a stub (if at all) was never used by these code paths
    assert _timm_shim.CALLS == []


@needs_timm
def test_config_detection(tmp_path):
    save_timm(tmp_path, "eva02_base_patch14_224", **TINY)
    config = json.loads((tmp_path / "config.json").read_text())
    family = bb.families.family_of_config(config)
    cfg = family.from_hf(config)
    assert family.name == "eva02" and cfg.rope and cfg.rope_ref_grid == (16, 16) and cfg.mlp_norm
    assert (cfg.final_norm, cfg.pool, cfg.key_bias, cfg.act) == ("pooled", "patch_mean", False, "swiglu")
    assert cfg.mlp_dim == int(32 * 4 * 2 / 3)


def _tiny_eva_tensors(tmp_path):
    from safetensors.numpy import load_file

    save_timm(tmp_path, "eva02_base_patch14_224", **TINY)
    return json.loads((tmp_path / "config.json").read_text()), load_file(tmp_path / "model.safetensors")


def _save(path, config: dict, tensors: dict):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))


@needs_timm
def test_strict_conversion_errors(tmp_path):
    config, tensors = _tiny_eva_tensors(tmp_path / "ok")
    broken = dict(tensors)
    del broken["blocks.1.mlp.fc1_x.bias"]
    broken["blocks.0.attn.k_proj.bias"] = np.zeros(32, np.float32)  # EVA's key projection has no bias
    broken["pos_embed"] = np.zeros((1, 10, 32), np.float32)
    _save(tmp_path / "broken", config, broken)
    with pytest.raises(bb.ConversionError) as err:
        bb.load(str(tmp_path / "broken"))
    message = str(err.value)
    assert "(eva02)" in message and "3 problems" in message, message
    assert "missing checkpoint tensor 'blocks.1.mlp.fc1_x.bias'" in message
    assert "unused checkpoint tensor 'blocks.0.attn.k_proj.bias'" in message
    assert "shape mismatch: 'pos_embed' (1, 10, 32)" in message

    # a config.json that describes another layout than the tensors: fused q/k/v claimed, separate stored
    _save(tmp_path / "fused", dict(config, model_args=dict(config["model_args"], qkv_fused=True)), tensors)
    with pytest.raises(bb.ConversionError, match=r"missing checkpoint tensor 'blocks\.0\.attn\.qkv\.weight'"):
        bb.load(str(tmp_path / "fused"))

    # a classifier head is deliberately unused; anything else extra is an error
    _save(tmp_path / "head", config, dict(tensors, **{"head.weight": np.zeros((5, 32), np.float32)}))
    assert bb.load(str(tmp_path / "head")).embed_dim == 32


def test_unsupported_timm_configs_fail_clearly(tmp_path):
    from jdd.backbones.families import family_of_config

    base = {"architecture": "eva02_base_patch14_224", "model_args": dict(TINY)}
    with pytest.raises(ValueError, match=r"architecture 'eva03_base'.*supported timm architectures.*eva02_base"):
        family_of_config({"architecture": "eva03_base"})
    eva = bb.FAMILIES["eva02"]
    for args, match in [(dict(qk_norm=True), "qk_norm=True .*not supported"),
                        (dict(global_pool="map"), r"global_pool='map'.*supported: \['token', 'avg'\]"),
                        (dict(num_reg_tokens=4), "num_reg_tokens=4"),
                        (dict(use_fc_norm=True, use_post_transformer_norm=True), "both a final norm and an fc_norm"),
                        (dict(mystery_arg=1), r"arguments \['mystery_arg'\].*not supported")]:
        with pytest.raises(ValueError, match=match):
            eva.from_hf(dict(base, model_args=dict(TINY, **args)))
    # training-only arguments are fine
    assert eva.from_hf(dict(base, model_args=dict(TINY, drop_path_rate=0.1))).width == 32
    # no pretrained_cfg: the family's normalisation; pretrained_cfg input_size fixes the size when
    # the factory does not (timm's vit_* factories)
    assert eva.from_hf({"architecture": "eva02_small_patch14_224"}).mean == bb.vit.CLIP_MEAN
    vit = bb.FAMILIES["timm_vit"].from_hf({"architecture": "deit_base_patch16_224", "pretrained_cfg": {
        "input_size": [3, 384, 384], "fixed_input_size": True, "mean": [0.5] * 3, "std": [0.5] * 3}})
    assert (vit.image_size, vit.mean, vit.pool) == (384, (0.5,) * 3, "cls")


def test_timm_hub_name_offline(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network in tests
    for spec in ("timm/eva02_base_patch14_224.mim_in22k", "hf-hub:timm/eva02_base_patch14_224.mim_in22k"):
        with pytest.raises(OSError, match=r"could not fetch backbone 'timm/eva02_base_patch14_224\.mim_in22k'"
                                          r".*pass its path instead"):
            bb.load(spec)


@pytest.mark.parametrize("family", ["eva02", "timm_vit"])
def test_grad_wrt_images(family):
    backbone = bb.create(family, "test")

    @jax.jit
    def grad(images):
        return jax.grad(lambda x: jnp.sum(backbone.apply(backbone.params, x)["embedding"] ** 2))(images)

    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 24, 24, 3))
    g = np.asarray(grad(images))
    assert g.shape == (2, 24, 24, 3)
    assert np.isfinite(g).all() and np.abs(g).max() > 0


def _meta_model(architecture: str, **kwargs):
    import torch

    with torch.device("meta"):
        return timm.create_model(architecture, pretrained=False, **kwargs)


@needs_timm
@pytest.mark.slow
@pytest.mark.parametrize("family", ["eva02", "timm_vit"])
def test_architecture_tables_match_timm(family):
    """Every timm architecture jdd knows has timm's parameter shapes, at full depth and one block deep
    (converted strictly from the state dict names and shapes of timm's model)."""
    fam = bb.FAMILIES[family]
    for architecture in fam.architectures:
        config = {"architecture": architecture}
        cfg = fam.from_hf(config)
        model = _meta_model(architecture, num_classes=0)
        assert cfg.image_size == model.patch_embed.img_size[0], architecture
        timm_count = sum(p.numel() for p in model.parameters())
        assert timm_count == sum(int(np.prod(s)) for s in bb.param_shapes(cfg).values()), architecture
        shallow = dict(config, model_args={"depth": 1})
        state = _meta_model(architecture, depth=1).state_dict()  # with its classifier head: ignored
        tensors = {k: np.zeros(v.shape, np.float32) for k, v in state.items()}
        cfg1 = fam.from_hf(shallow)
        bb.convert.convert(tensors, fam.conversion_rules(cfg1, shallow, tensors), bb.param_shapes(cfg1), fam.ignored)
    # the named variants are the published architectures
    named = {"eva02": {"Ti/14": "eva02_tiny_patch14_224", "S/14": "eva02_small_patch14_224",
                       "B/14": "eva02_base_patch14_224", "L/14": "eva02_large_patch14_224"},
             "timm_vit": {"Ti/16": "deit_tiny_patch16_224", "S/16": "deit_small_patch16_224",
                          "B/16": "vit_base_patch16_224", "L/16": "vit_large_patch16_224"}}[family]
    assert set(named) | {bb.TEST_VARIANT} == set(bb.variants(family))
    for variant, architecture in named.items():
        assert fam.config(variant) == fam.from_hf({"architecture": architecture}), variant


def test_rotary_table_matches_timm():
    """jdd's NumPy rotary tables against timm's, at the reference grid, another grid, and without one."""
    if timm is None:
        skip_unless_ci(str(TIMM_MISSING))
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    from jdd.backbones import rope

    for grid, ref in [((4, 4), (16, 16)), ((6, 3), (16, 16)), ((5, 7), None)]:
        timm_rope = RotaryEmbeddingCat(dim=16, in_pixels=False, feat_shape=list(grid), ref_feat_shape=ref)
        sin_ref, cos_ref = timm_rope.get_embed().numpy().reshape(grid[0] * grid[1], 2, 16).transpose(1, 0, 2)
        sin, cos = rope.sin_cos(16, grid, 10000.0, ref)
        np.testing.assert_allclose(sin, sin_ref, atol=2e-6)
        np.testing.assert_allclose(cos, cos_ref, atol=2e-6)


@needs_timm
@pytest.mark.slow
def test_timm_checkpoint_loads_without_torch(tmp_path):
    save_timm(tmp_path, "eva02_small_patch14_224", **TINY)
    code = ("import sys, jdd.backbones as bb; b = bb.load(sys.argv[1]); assert b.family == 'eva02'; "
            "bad = [m for m in ('torch', 'timm', 'transformers') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_timm_families_are_registered():
    assert {"eva02", "timm_vit"} <= set(bb.FAMILIES)
    assert all(bb.FAMILIES[f.name] is f for f in timm_families.FAMILIES)
