"""Parity of jdd.backbones with the `transformers` PyTorch models, per family.

Each HF model is built from a tiny random config, every parameter perturbed with noise (so that
zero biases or unit layer scales cannot make parity trivially true), saved with save_pretrained,
loaded with jdd.backbones.load, and compared in float32 at the native size and at interpolated sizes.
"""
import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

import jdd.backbones as bb  # noqa: E402
from jdd.backbones import vit  # noqa: E402
from _parity import perturbed, rel_diff  # noqa: E402

RTOL = 1e-4
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32)


@dataclasses.dataclass
class Case:
    """A family under test: how to build its tiny HF model and read the reference features."""

    make: Callable[[], "torch.nn.Module"]
    mean: tuple
    std: tuple
    # (model, pixel_values, interpolate) -> dict with "embedding", "last_hidden_state" and optionally "cls"
    forward: Callable


def _vit_forward(model, pixels, interpolate):
    out = model(pixel_values=pixels, interpolate_pos_encoding=interpolate)
    return {"embedding": out.last_hidden_state[:, 0], "cls": out.last_hidden_state[:, 0],
            "last_hidden_state": out.last_hidden_state}


def _dinov2_forward(model, pixels, interpolate):  # DINOv2 always interpolates
    out = model(pixel_values=pixels)
    return {"embedding": out.pooler_output, "cls": out.pooler_output, "last_hidden_state": out.last_hidden_state}


def _clip_forward(model, pixels, interpolate):
    out = model(pixel_values=pixels, interpolate_pos_encoding=interpolate)
    tower = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=interpolate)
    return {"embedding": out.image_embeds, "cls": tower.pooler_output, "last_hidden_state": out.last_hidden_state}


def _siglip_forward(model, pixels, interpolate):
    out = model(pixel_values=pixels, interpolate_pos_encoding=interpolate)
    return {"embedding": out.pooler_output, "last_hidden_state": out.last_hidden_state}


T = transformers
CASES = {
    "dinov2": Case(lambda: T.Dinov2Model(T.Dinov2Config(**TINY, mlp_ratio=2)),
                   vit.IMAGENET_MEAN, vit.IMAGENET_STD, _dinov2_forward),
    "dinov2_swiglu": Case(lambda: T.Dinov2Model(T.Dinov2Config(**TINY, mlp_ratio=4, use_swiglu_ffn=True)),
                          vit.IMAGENET_MEAN, vit.IMAGENET_STD, _dinov2_forward),
    "dinov2_registers": Case(
        lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**TINY, mlp_ratio=2, num_register_tokens=3)),
        vit.IMAGENET_MEAN, vit.IMAGENET_STD, _dinov2_forward),
    "dino": Case(lambda: T.ViTModel(T.ViTConfig(**TINY, intermediate_size=64, layer_norm_eps=1e-6)),
                 vit.IMAGENET_MEAN, vit.IMAGENET_STD, _vit_forward),
    "clip": Case(lambda: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**TINY, intermediate_size=64,
                                                                            projection_dim=24)),
                 vit.CLIP_MEAN, vit.CLIP_STD, _clip_forward),
    "siglip": Case(lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**TINY, intermediate_size=64)),
                   vit.HALF, vit.HALF, _siglip_forward),
}


def reference(model, forward, images, mean, std, interpolate):
    """Features of NHWC images in [0, 1] from the PyTorch model, normalised as the family does."""
    pixels = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    with torch.no_grad():
        out = forward(model, torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), interpolate)
    return {k: v.numpy() for k, v in out.items()}


def assert_parity(backbone, model, forward, mean, std, size, seed=0, batch=2):
    images = np.random.default_rng(seed).random((batch, size, size, 3), dtype=np.float32)
    ours = jax.jit(backbone.apply)(backbone.params, images)
    ref = reference(model, forward, images, mean, std, interpolate=size != backbone.image_size)
    for key, value in ref.items():
        assert ours[key].shape == value.shape, key
        assert rel_diff(ours[key], value) <= RTOL, (key, size, rel_diff(ours[key], value))
    patches = ref["last_hidden_state"][:, -(size // backbone.patch_size) ** 2:]
    assert rel_diff(ours["patch_mean"], patches.mean(1)) <= RTOL


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """(case name, perturbed HF model, its save_pretrained directory)."""
    case = CASES[request.param]
    torch.manual_seed(0)
    model = perturbed(case.make())
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def test_parity_with_transformers(saved):
    name, model, path = saved
    case = CASES[name]
    backbone = bb.load(str(path))
    assert backbone.image_size == 32 and backbone.patch_size == 8
    # native size, a smaller grid (downsampled position embeddings) and a larger non-square-able one
    for size in (32, 16, 48):
        assert_parity(backbone, model, case.forward, case.mean, case.std, size)


def test_two_tower_checkpoints_load_the_vision_tower(tmp_path):
    """Full CLIPModel / SiglipModel checkpoints: text tower ignored, vision tower matches."""
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    vision = dict(TINY, intermediate_size=64)
    clip = perturbed(T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)))
    siglip = perturbed(T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=vision)))
    images = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)
    for name, model, mean, std in (("clip", clip, vit.CLIP_MEAN, vit.CLIP_STD), ("siglip", siglip, vit.HALF, vit.HALF)):
        model.save_pretrained(tmp_path / name)
        backbone = bb.load(str(tmp_path / name))
        assert backbone.family == name
        pixels = torch.from_numpy(((images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
                                  .transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            ref = model.get_image_features(pixel_values=pixels)
        ref = getattr(ref, "pooler_output", ref).numpy()
        ours = jax.jit(backbone.apply)(backbone.params, images)["embedding"]
        assert rel_diff(ours, ref) <= RTOL, name


@pytest.mark.slow
def test_real_dinov2s_parity(dinov2s_dir):
    """The real pretrained DINOv2 ViT-S/14 at 224 and 112 px against transformers.Dinov2Model."""
    backbone = bb.load(str(dinov2s_dir))
    assert (backbone.family, backbone.patch_size, backbone.embed_dim) == ("dinov2", 14, 384)
    model = T.Dinov2Model.from_pretrained(str(dinov2s_dir)).eval()
    for size in (224, 112):
        assert_parity(backbone, model, _dinov2_forward, vit.IMAGENET_MEAN, vit.IMAGENET_STD, size, batch=2)
