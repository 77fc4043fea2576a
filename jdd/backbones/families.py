"""The registry of backbone families, and the Hugging Face ones: variant tables, config parsing, rules.

`FAMILIES` holds every family: those here, which load Hugging Face `transformers` checkpoints
(chosen by config.json's `model_type`), and those of `timm_families`, which load timm checkpoints
(chosen by config.json's `architecture`). See `family.Family` for what a family knows.
Hugging Face checkpoint names are those `save_pretrained` writes and the hub hosts (the "legacy" layout, e.g.
`attention.attention.query`), which transformers 5 renames only in memory.
"""
from __future__ import annotations

import dataclasses

from jdd.backbones import convert as cv
from jdd.backbones import timm_families
from jdd.backbones.family import TEST_SIZE as _TEST_SIZE
from jdd.backbones.family import TEST_VARIANT, Family
from jdd.backbones.family import square as _square
from jdd.backbones.vit import CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD, SWIGLU, ViTConfig


def _sub_config(config: dict, key: str) -> dict:
    """The vision sub-config of a two-tower config (also its pre-v4.20 `*_dict` spelling)."""
    return config.get(key) or config.get(f"{key}_dict") or {}


# ---------------------------------------------------------------------------------------- DINOv2
_DINOV2_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                        hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, qkv_bias=True,
                        use_swiglu_ffn=False)


def _dinov2_from_hf(config: dict, patch_default: int, registers: bool) -> ViTConfig:
    """Dinov2Config (or Dinov2WithRegistersConfig, whose position resampling is antialiased) -> ViTConfig."""
    c = dict(_DINOV2_DEFAULTS, **config)
    width = c["hidden_size"]
    hidden = int(width * c["mlp_ratio"])
    if c["use_swiglu_ffn"]:
        # transformers' Dinov2SwiGLUFFN: two thirds of the MLP size, rounded up to a multiple of 8
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    return ViTConfig(
        width=width, depth=c["num_hidden_layers"], heads=c["num_attention_heads"], mlp_dim=hidden,
        patch_size=_square(c.get("patch_size", patch_default), "patch_size"),
        image_size=_square(c["image_size"], "image_size"),
        act=SWIGLU if c["use_swiglu_ffn"] else c["hidden_act"], layer_scale=True, qkv_bias=c["qkv_bias"],
        ln_eps=c["layer_norm_eps"], num_registers=c.get("num_register_tokens", 4) if registers else 0,
        pos_antialias=registers, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _embedding_rules(p: str) -> list[cv.Rule]:
    """Class token, positions, patch projection and final layernorm: the same in HF DINOv2 and ViT."""
    return [
        cv.Rule(f"{p}embeddings.cls_token", ("cls_token",), cv.vector),
        cv.Rule(f"{p}embeddings.position_embeddings", ("pos_embedding",), cv.rows),
        cv.Rule(f"{p}embeddings.patch_embeddings.projection.weight", ("patch_kernel",), cv.conv_kernel),
        cv.Rule(f"{p}embeddings.patch_embeddings.projection.bias", ("patch_bias",)),
        *cv.layernorm(f"{p}layernorm", ("norm",)),
    ]


def _dinov2_rules(cfg: ViTConfig, p: str) -> list[cv.Rule]:
    rules = _embedding_rules(p)
    if cfg.num_registers:
        rules.append(cv.Rule(f"{p}embeddings.register_tokens", ("registers",), cv.rows))
    for i in range(cfg.depth):
        h, b = f"{p}encoder.layer.{i}", (f"block_{i}",)
        attn = {k: f"{h}.attention.attention.{k}" for k in ("query", "key", "value")}
        rules += cv.attention(dict(attn, out=f"{h}.attention.output.dense"), b + ("attn",), cfg.heads, cfg.qkv_bias)
        rules += cv.layernorm(f"{h}.norm1", b + ("norm1",)) + cv.layernorm(f"{h}.norm2", b + ("norm2",))
        rules += [cv.Rule(f"{h}.layer_scale1.lambda1", b + ("ls1", "scale")),
                  cv.Rule(f"{h}.layer_scale2.lambda1", b + ("ls2", "scale"))]
        fc1, fc2 = ("weights_in", "weights_out") if cfg.act == SWIGLU else ("fc1", "fc2")
        rules += cv.linear(f"{h}.mlp.{fc1}", b + ("mlp", "fc1")) + cv.linear(f"{h}.mlp.{fc2}", b + ("mlp", "fc2"))
    return rules


# The mask token only replaces masked patches in masked-image pre-training; a classifier head
# (ForImageClassification checkpoints) is not part of the encoder.
_DINOV2_IGNORED = (r"embeddings\.mask_token$", r"^classifier\.")

DINOV2 = Family(
    name="dinov2",
    base=dict(layer_scale=True, ln_eps=1e-6, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    variants={
        "S/14": (384, 12, 6, 1536, 14, 518),
        "B/14": (768, 12, 12, 3072, 14, 518),
        "L/14": (1024, 24, 16, 4096, 14, 518),
        "g/14": (1536, 40, 24, 4096, 14, 518, dict(act=SWIGLU)),
        TEST_VARIANT: _TEST_SIZE,
    },
    model_types=("dinov2",),
    from_hf=lambda c: _dinov2_from_hf(c, patch_default=14, registers=False),
    rules=_dinov2_rules, anchor="embeddings.cls_token", prefixes=("", "dinov2."), ignored=_DINOV2_IGNORED,
)

DINOV2_REGISTERS = dataclasses.replace(
    DINOV2,
    name="dinov2_registers",
    base=dict(DINOV2.base, num_registers=4, pos_antialias=True),
    model_types=("dinov2_with_registers",),
    from_hf=lambda c: _dinov2_from_hf(c, patch_default=16, registers=True),
    prefixes=("", "dinov2_with_registers."),
)

# ------------------------------------------------------------------------------ DINO v1 (ViTModel)
_VIT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, qkv_bias=True)


def _vit_from_hf(config: dict) -> ViTConfig:
    c = dict(_VIT_DEFAULTS, **config)
    return ViTConfig(
        width=c["hidden_size"], depth=c["num_hidden_layers"], heads=c["num_attention_heads"],
        mlp_dim=c["intermediate_size"], patch_size=_square(c["patch_size"], "patch_size"),
        image_size=_square(c["image_size"], "image_size"), act=c["hidden_act"], qkv_bias=c["qkv_bias"],
        ln_eps=c["layer_norm_eps"], mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _vit_rules(cfg: ViTConfig, p: str) -> list[cv.Rule]:
    rules = _embedding_rules(p)
    for i in range(cfg.depth):
        h, b = f"{p}encoder.layer.{i}", (f"block_{i}",)
        attn = {k: f"{h}.attention.attention.{k}" for k in ("query", "key", "value")}
        rules += cv.attention(dict(attn, out=f"{h}.attention.output.dense"), b + ("attn",), cfg.heads, cfg.qkv_bias)
        rules += cv.layernorm(f"{h}.layernorm_before", b + ("norm1",))
        rules += cv.layernorm(f"{h}.layernorm_after", b + ("norm2",))
        rules += cv.linear(f"{h}.intermediate.dense", b + ("mlp", "fc1"))
        rules += cv.linear(f"{h}.output.dense", b + ("mlp", "fc2"))
    return rules


DINO = Family(
    name="dino",
    # DINO's own layernorm epsilon (HF's ViTConfig default of 1e-12 comes from BERT).
    base=dict(ln_eps=1e-6, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    variants={
        "S/16": (384, 12, 6, 1536, 16, 224),
        "S/8": (384, 12, 6, 1536, 8, 224),
        "B/16": (768, 12, 12, 3072, 16, 224),
        "B/8": (768, 12, 12, 3072, 8, 224),
        TEST_VARIANT: _TEST_SIZE,
    },
    model_types=("vit",),
    from_hf=_vit_from_hf, rules=_vit_rules, anchor="embeddings.cls_token", prefixes=("", "vit."),
    # ViTModel's tanh pooler is a supervised-classification head, not part of DINO's features.
    ignored=(r"^(vit\.)?pooler\.dense\.", r"embeddings\.mask_token$", r"^classifier\."),
)


# ------------------------------------------------------------------------- CLIP and SigLIP towers
def _tower_rules(cfg: ViTConfig, p: str) -> list[cv.Rule]:
    """Encoder layers and final layernorm, named as in CLIPEncoder / SiglipEncoder."""
    rules = cv.layernorm(f"{p}post_layernorm", ("norm",))
    for i in range(cfg.depth):
        h, b = f"{p}encoder.layers.{i}", (f"block_{i}",)
        names = {"query": f"{h}.self_attn.q_proj", "key": f"{h}.self_attn.k_proj",
                 "value": f"{h}.self_attn.v_proj", "out": f"{h}.self_attn.out_proj"}
        rules += cv.attention(names, b + ("attn",), cfg.heads)
        rules += cv.layernorm(f"{h}.layer_norm1", b + ("norm1",)) + cv.layernorm(f"{h}.layer_norm2", b + ("norm2",))
        rules += cv.linear(f"{h}.mlp.fc1", b + ("mlp", "fc1")) + cv.linear(f"{h}.mlp.fc2", b + ("mlp", "fc2"))
    return rules


_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                             num_attention_heads=12, image_size=224, patch_size=32, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5)


def _clip_from_hf(config: dict) -> ViTConfig:
    if config.get("model_type") == "clip":  # a full two-tower CLIPModel checkpoint
        c = dict(_CLIP_VISION_DEFAULTS, **_sub_config(config, "vision_config"))
        c["projection_dim"] = config.get("projection_dim", 512)
    else:
        c = dict(_CLIP_VISION_DEFAULTS, **config)
    # CLIPVisionModel checkpoints have no projection: their embedding is the normed class token.
    projected = "CLIPVisionModel" not in (config.get("architectures") or [])
    return ViTConfig(
        width=c["hidden_size"], depth=c["num_hidden_layers"], heads=c["num_attention_heads"],
        mlp_dim=c["intermediate_size"], patch_size=_square(c["patch_size"], "patch_size"),
        image_size=_square(c["image_size"], "image_size"), act=c["hidden_act"], ln_eps=c["layer_norm_eps"],
        patch_bias=False, pre_norm=True, final_norm="cls", pool="proj" if projected else "cls",
        projection_dim=c["projection_dim"] if projected else 0, mean=CLIP_MEAN, std=CLIP_STD)


def _clip_rules(cfg: ViTConfig, p: str) -> list[cv.Rule]:
    rules = [
        cv.Rule(f"{p}embeddings.class_embedding", ("cls_token",), cv.vector),
        cv.Rule(f"{p}embeddings.position_embedding.weight", ("pos_embedding",), cv.rows),
        cv.Rule(f"{p}embeddings.patch_embedding.weight", ("patch_kernel",), cv.conv_kernel),
        *cv.layernorm(f"{p}pre_layrnorm", ("pre_norm",)),  # sic: transformers' spelling
        *_tower_rules(cfg, p),
    ]
    if cfg.pool == "proj":
        rules.append(cv.Rule("visual_projection.weight", ("proj", "kernel"), cv.linear_kernel))
    return rules


# Two-tower checkpoints also hold the text tower and the contrastive temperature/bias; old ones
# store the integer `position_ids` buffer.
_TWO_TOWER_IGNORED = (r"^text_model\.", r"^text_projection\.", r"^logit_scale$", r"^logit_bias$",
                      r"position_ids$")

CLIP = Family(
    name="clip",
    base=dict(act="quick_gelu", ln_eps=1e-5, patch_bias=False, pre_norm=True, final_norm="cls", pool="proj",
              mean=CLIP_MEAN, std=CLIP_STD),
    variants={
        "B/32": (768, 12, 12, 3072, 32, 224, dict(projection_dim=512)),
        "B/16": (768, 12, 12, 3072, 16, 224, dict(projection_dim=512)),
        "L/14": (1024, 24, 16, 4096, 14, 224, dict(projection_dim=768)),
        TEST_VARIANT: _TEST_SIZE + (dict(projection_dim=32),),
    },
    model_types=("clip", "clip_vision_model"),
    from_hf=_clip_from_hf, rules=_clip_rules, anchor="embeddings.class_embedding",
    prefixes=("vision_model.", ""), ignored=_TWO_TOWER_IGNORED,
)

_SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                               vision_use_head=True)


def _siglip_from_hf(config: dict) -> ViTConfig:
    raw = _sub_config(config, "vision_config") if config.get("model_type") == "siglip" else config
    c = dict(_SIGLIP_VISION_DEFAULTS, **raw)
    return ViTConfig(
        width=c["hidden_size"], depth=c["num_hidden_layers"], heads=c["num_attention_heads"],
        mlp_dim=c["intermediate_size"], patch_size=_square(c["patch_size"], "patch_size"),
        image_size=_square(c["image_size"], "image_size"), act=c["hidden_act"], ln_eps=c["layer_norm_eps"],
        class_token=False, pool="map" if c["vision_use_head"] else "patch_mean", mean=HALF, std=HALF)


def _siglip_rules(cfg: ViTConfig, p: str) -> list[cv.Rule]:
    rules = [
        cv.Rule(f"{p}embeddings.position_embedding.weight", ("pos_embedding",), cv.rows),
        cv.Rule(f"{p}embeddings.patch_embedding.weight", ("patch_kernel",), cv.conv_kernel),
        cv.Rule(f"{p}embeddings.patch_embedding.bias", ("patch_bias",)),
        *_tower_rules(cfg, p),
    ]
    if cfg.pool == "map":
        h, b = f"{p}head", ("head",)
        rules += [
            cv.Rule(f"{h}.probe", b + ("probe",)),
            cv.Rule(f"{h}.attention.in_proj_weight", b + ("in_kernel",), cv.linear_kernel),
            cv.Rule(f"{h}.attention.in_proj_bias", b + ("in_bias",)),
            *cv.linear(f"{h}.attention.out_proj", b + ("out",)),
            *cv.layernorm(f"{h}.layernorm", b + ("norm",)),
            *cv.linear(f"{h}.mlp.fc1", b + ("mlp", "fc1")),
            *cv.linear(f"{h}.mlp.fc2", b + ("mlp", "fc2")),
        ]
    return rules


SIGLIP = Family(
    name="siglip",
    base=dict(act="gelu_pytorch_tanh", ln_eps=1e-6, class_token=False, pool="map", mean=HALF, std=HALF),
    variants={
        "B/16": (768, 12, 12, 3072, 16, 224),
        "L/16": (1024, 24, 16, 4096, 16, 256),
        "So400m/14": (1152, 27, 16, 4304, 14, 384),
        TEST_VARIANT: _TEST_SIZE,
    },
    model_types=("siglip", "siglip_vision_model"),
    from_hf=_siglip_from_hf, rules=_siglip_rules, anchor="embeddings.position_embedding.weight",
    prefixes=("vision_model.", ""), ignored=_TWO_TOWER_IGNORED,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (DINOV2, DINOV2_REGISTERS, DINO, CLIP, SIGLIP,
                                                    *timm_families.FAMILIES)}


def family_named(name: str) -> Family:
    """The registered family `name`, or a ValueError listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown backbone family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_config(config: dict) -> Family:
    """The family that loads a config.json dict: by `model_type` (Hugging Face) or `architecture` (timm)."""
    model_type = config.get("model_type")
    if model_type is None and "architecture" in config:
        return _timm_family(config["architecture"])
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"config.json has model_type {model_type!r}, which no backbone family loads; "
                     f"supported model types: {known} (or a timm config.json with an \"architecture\")")


def _timm_family(architecture: str) -> Family:
    for family in FAMILIES.values():
        if architecture in family.architectures:
            return family
    known = sorted(a for f in FAMILIES.values() for a in f.architectures)
    raise ValueError(f"timm config.json has architecture {architecture!r}, which no backbone family loads; "
                     f"supported timm architectures: {known}")
