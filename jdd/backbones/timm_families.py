"""The timm families: plain timm ViTs (DeiT, MAE, MoCo-v3, DINO) and EVA-02, from timm checkpoints.

A timm checkpoint directory (what `timm.models.save_for_hf` writes and the hub's `timm/...` repos
hold) has `model.safetensors`, the model's own `state_dict` (timm's native names, e.g.
`blocks.0.attn.qkv.weight`), and a `config.json` with

    "architecture": the timm model name, e.g. "eva02_base_patch14_224" (its factory's arguments are
                    copied into `architectures` below, so that neither torch nor timm is imported);
    "model_args":   optional arguments that override the factory's (as timm honours them);
    "pretrained_cfg": optional; "mean"/"std" normalise the input (else the family's, see below),
                    "input_size" fixes the image size of architectures whose factory does not,
                    "global_pool" is a fallback for the pooling, as in timm.

Checkpoints of the original EVA-02 / MAE / MoCo-v3 repositories must be in timm's layout first
(timm's `checkpoint_filter_fn` does that; MoCo-v3's ViT-B already is, minus its prefix and heads).

The probe embedding follows timm's pooled features (`forward_head(pre_logits=True)`): global_pool
"token" is the class token after the final layernorm (DeiT, MAE, MoCo-v3, DINO); "avg" is the mean
of the patch tokens, then timm's `fc_norm` layernorm (EVA-02).
"""
from __future__ import annotations

from jdd.backbones import convert as cv
from jdd.backbones.family import TEST_SIZE, TEST_VARIANT, Family, square
from jdd.backbones.vit import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SWIGLU, ViTConfig

LN_EPS = 1e-6  # timm's LayerNorm
EVA02_MLP_RATIO = 4 * 2 / 3  # timm's SwiGLU MLP size for EVA-02, int(width * ratio) per branch

# Arguments of timm's VisionTransformer / Eva constructors as jdd reads them, with timm's defaults.
_VIT_ARGS = dict(img_size=224, patch_size=16, in_chans=3, global_pool="token", embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_norm=False, scale_attn_norm=False,
                 scale_mlp_norm=False, proj_bias=True, init_values=None, class_token=True, pos_embed="learn",
                 no_embed_class=False, reg_tokens=0, pre_norm=False, final_norm=True, fc_norm=None,
                 pool_include_prefix=False, act_layer=None, norm_layer=None, embed_norm_layer=None)
_EVA_ARGS = dict(img_size=224, patch_size=16, in_chans=3, global_pool="avg", embed_dim=768, depth=12, num_heads=12,
                 num_kv_heads=None, qkv_bias=True, qkv_fused=True, qk_norm=False, mlp_ratio=4.0, swiglu_mlp=False,
                 swiglu_align_to=0, scale_mlp=False, scale_attn_inner=False, attn_type="eva", norm_layer=None,
                 init_values=None, attn_only_layer_scale=False, class_token=True, num_reg_tokens=0,
                 no_embed_class=False, use_abs_pos_emb=True, use_rot_pos_emb=False, rope_type="cat",
                 rope_grid_offset=0.0, rope_grid_indexing="ij", rope_temperature=10000.0, rope_rotate_half=False,
                 rope_mrope_section=None, use_post_norm=False, use_pre_transformer_norm=False,
                 use_post_transformer_norm=None, use_fc_norm=None, attn_pool_num_heads=None,
                 attn_pool_mlp_ratio=None, ref_feat_shape=None)
# Arguments that change training only (dropout, initialisation, RoPE coordinate augmentation), the
# classifier head (never converted) or input padding (jdd needs sizes divisible by the patch).
_NO_EFFECT = {"num_classes", "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
              "drop_path_rate", "weight_init", "fix_init", "head_init_scale", "dynamic_img_size", "dynamic_img_pad",
              "rope_shift_coords", "rope_jitter_coords", "rope_rescale_coords"}
_ACTIVATIONS = {None: "gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu",
                "silu": "silu", "swish": "silu", "relu": "relu"}
_NORM_LAYERS = (None, "layernorm")  # timm's LayerNorm, eps 1e-6
_POOLS = ("token", "avg")


# ------------------------------------------------------------------------------ timm config.json
def model_kwargs(config: dict, architectures: dict, defaults: dict) -> dict:
    """The constructor arguments timm would build a timm config.json with: class defaults, then the
    architecture's factory arguments, then `model_args`, then what `pretrained_cfg` supplies."""
    arch = config["architecture"]
    if arch not in architectures:
        raise ValueError(f"unknown timm architecture {arch!r}; known: {sorted(architectures)}")
    pretrained = config["pretrained_cfg"] if "pretrained_cfg" in config else config  # legacy: one flat dict
    given = dict(architectures[arch], **(config.get("model_args") or {}))
    if pretrained.get("global_pool") is not None:
        given.setdefault("global_pool", pretrained["global_pool"])
    if pretrained.get("fixed_input_size") and pretrained.get("input_size"):
        given.setdefault("img_size", list(pretrained["input_size"])[-2:])
    unknown = sorted(set(given) - set(defaults) - _NO_EFFECT)
    if unknown:
        raise ValueError(f"timm model arguments {unknown} of {arch!r} are not supported by jdd's ViT")
    return dict(defaults, **{k: v for k, v in given.items() if k not in _NO_EFFECT})


def _require(kwargs: dict, arch: str, **expected) -> None:
    """ValueError unless each timm argument has the one value jdd supports."""
    for key, value in expected.items():
        if kwargs[key] != value:
            raise ValueError(f"timm model argument {key}={kwargs[key]!r} of {arch!r} is not supported "
                             f"(jdd's ViT supports only {key}={value!r})")


def _one_of(kwargs: dict, arch: str, key: str, allowed) -> None:
    if kwargs[key] not in allowed:
        raise ValueError(f"timm model argument {key}={kwargs[key]!r} of {arch!r} is not supported; "
                         f"supported: {list(allowed)}")


def _normalisation(config: dict, default: tuple) -> dict:
    """mean/std from pretrained_cfg, else the family's default (what all its published checkpoints use)."""
    pretrained = config["pretrained_cfg"] if "pretrained_cfg" in config else config
    mean, std = pretrained.get("mean"), pretrained.get("std")
    if mean is None or std is None:
        mean, std = default
    return dict(mean=tuple(map(float, mean)), std=tuple(map(float, std)))


def _final_norm(arch: str, global_pool: str, post_norm: bool, fc_norm: bool) -> dict:
    """timm's final layernorm (`norm` over all tokens, or `fc_norm` after pooling) -> ViTConfig fields."""
    if post_norm == fc_norm:
        raise ValueError(f"timm {arch!r} has {'both' if post_norm else 'neither'} a final norm and an fc_norm; "
                         "jdd's ViT supports exactly one of them")
    pool = "cls" if global_pool == "token" else "patch_mean"
    if post_norm:
        return dict(final_norm="tokens", pool=pool)
    return dict(final_norm="cls" if pool == "cls" else "pooled", pool=pool)


# --------------------------------------------------------------------------------- plain timm ViT
def _vit_kwargs(config: dict) -> dict:
    return model_kwargs(config, TIMM_VIT.architectures, _VIT_ARGS)


def _vit_from_timm(config: dict) -> ViTConfig:
    arch, c = config["architecture"], _vit_kwargs(config)
    _require(c, arch, in_chans=3, qk_norm=False, proj_bias=True, pos_embed="learn", reg_tokens=0, final_norm=True,
             pool_include_prefix=False, embed_norm_layer=None)
    _one_of(c, arch, "global_pool", _POOLS)
    _one_of(c, arch, "act_layer", list(_ACTIVATIONS))
    _one_of(c, arch, "norm_layer", _NORM_LAYERS)
    fc_norm = c["global_pool"] == "avg" if c["fc_norm"] is None else c["fc_norm"]
    width = c["embed_dim"]
    return ViTConfig(
        width=width, depth=c["depth"], heads=c["num_heads"], mlp_dim=int(width * c["mlp_ratio"]),
        patch_size=square(c["patch_size"], "patch_size"), image_size=square(c["img_size"], "img_size"),
        act=_ACTIVATIONS[c["act_layer"]], class_token=c["class_token"], layer_scale=bool(c["init_values"]),
        qkv_bias=c["qkv_bias"], attn_norm=c["scale_attn_norm"], mlp_norm=c["scale_mlp_norm"],
        patch_bias=not c["pre_norm"], pre_norm=c["pre_norm"], ln_eps=LN_EPS, pos_antialias=True,
        **_final_norm(arch, c["global_pool"], post_norm=not fc_norm, fc_norm=fc_norm),
        **_normalisation(config, (IMAGENET_MEAN, IMAGENET_STD)))


def _vit_layout(config: dict) -> dict:
    c = _vit_kwargs(config)
    fc_norm = c["global_pool"] == "avg" if c["fc_norm"] is None else c["fc_norm"]
    return dict(no_embed_class=c["no_embed_class"], final_norm_name="fc_norm" if fc_norm else "norm")


def _embedding_rules(cfg: ViTConfig, no_embed_class: bool) -> list[cv.Rule]:
    """Class token, position embeddings (timm's `pos_embed`) and patch embedding."""
    rules = [cv.Rule("patch_embed.proj.weight", ("patch_kernel",), cv.conv_kernel)]
    if cfg.patch_bias:
        rules.append(cv.Rule("patch_embed.proj.bias", ("patch_bias",)))
    if cfg.pre_norm:
        rules += cv.layernorm("norm_pre", ("pre_norm",))
    if cfg.class_token:
        rules.append(cv.Rule("cls_token", ("cls_token",), cv.vector))
    # no_embed_class: the class token has no position embedding, the same as a zero one
    with_cls_row = no_embed_class and cfg.class_token
    rules.append(cv.Rule("pos_embed", ("pos_embedding",), _zero_first_row if with_cls_row else cv.rows))
    return rules


def _zero_first_row(t):
    rows = cv.rows(t)
    return cv.concat_rows(0 * rows[:1], rows)


def _vit_rules(cfg: ViTConfig, p: str, no_embed_class: bool, final_norm_name: str) -> list[cv.Rule]:
    rules = _embedding_rules(cfg, no_embed_class) + cv.layernorm(final_norm_name, ("norm",))
    heads = cfg.heads
    for i in range(cfg.depth):
        h, b = f"blocks.{i}", (f"block_{i}",)
        for j, part in enumerate(("query", "key", "value")):  # fused [q | k | v] projection
            rules.append(cv.Rule(f"{h}.attn.qkv.weight", b + ("attn", part, "kernel"),
                                 cv.part(j, 3, cv.heads_in(heads))))
            if cfg.qkv_bias:
                rules.append(cv.Rule(f"{h}.attn.qkv.bias", b + ("attn", part, "bias"),
                                     cv.part(j, 3, cv.heads_bias(heads))))
        rules += [cv.Rule(f"{h}.attn.proj.weight", b + ("attn", "out", "kernel"), cv.heads_out(heads)),
                  cv.Rule(f"{h}.attn.proj.bias", b + ("attn", "out", "bias"))]
        if cfg.attn_norm:
            rules += cv.layernorm(f"{h}.attn.norm", b + ("attn", "norm"))
        if cfg.layer_scale:
            rules += [cv.Rule(f"{h}.ls1.gamma", b + ("ls1", "scale")), cv.Rule(f"{h}.ls2.gamma", b + ("ls2", "scale"))]
        rules += cv.layernorm(f"{h}.norm1", b + ("norm1",)) + cv.layernorm(f"{h}.norm2", b + ("norm2",))
        rules += cv.linear(f"{h}.mlp.fc1", b + ("mlp", "fc1")) + cv.linear(f"{h}.mlp.fc2", b + ("mlp", "fc2"))
        if cfg.mlp_norm:
            rules += cv.layernorm(f"{h}.mlp.norm", b + ("mlp", "norm"))
    return rules


# The classifier head (fine-tuned checkpoints) is not part of the encoder.
_TIMM_IGNORED = (r"^head\.",)

_VIT_ARCHITECTURES = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_small_patch8_224": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch8_224": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12),
    "deit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}

TIMM_VIT = Family(
    name="timm_vit",
    base=dict(ln_eps=LN_EPS, pos_antialias=True, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    variants={
        "Ti/16": (192, 12, 3, 768, 16, 224),
        "S/16": (384, 12, 6, 1536, 16, 224),  # DeiT-S
        "B/16": (768, 12, 12, 3072, 16, 224),  # DeiT-B, MAE, MoCo-v3
        "L/16": (1024, 24, 16, 4096, 16, 224),
        TEST_VARIANT: TEST_SIZE,
    },
    model_types=(),
    architectures=_VIT_ARCHITECTURES,
    from_hf=_vit_from_timm, rules=_vit_rules, layout=_vit_layout, anchor="patch_embed.proj.weight",
    ignored=_TIMM_IGNORED,
)


# ----------------------------------------------------------------------------------------- EVA-02
def _eva_kwargs(config: dict) -> dict:
    return model_kwargs(config, EVA02.architectures, _EVA_ARGS)


def _eva_norms(c: dict) -> tuple[bool, bool]:
    """(final norm over all tokens, fc_norm after pooling), resolved as timm's Eva does."""
    fc_norm = c["global_pool"] == "avg" if c["use_fc_norm"] is None else c["use_fc_norm"]
    post_norm = not fc_norm if c["use_post_transformer_norm"] is None else c["use_post_transformer_norm"]
    return post_norm, fc_norm


def _eva_from_timm(config: dict) -> ViTConfig:
    arch, c = config["architecture"], _eva_kwargs(config)
    _require(c, arch, in_chans=3, num_kv_heads=None, qk_norm=False, swiglu_align_to=0, attn_type="eva",
             attn_only_layer_scale=False, num_reg_tokens=0, use_abs_pos_emb=True, rope_type="cat",
             rope_grid_offset=0.0, rope_grid_indexing="ij", rope_rotate_half=False, rope_mrope_section=None,
             use_post_norm=False)
    _one_of(c, arch, "global_pool", _POOLS)
    _one_of(c, arch, "norm_layer", _NORM_LAYERS)
    post_norm, fc_norm = _eva_norms(c)
    width, heads = c["embed_dim"], c["num_heads"]
    ref = c["ref_feat_shape"]
    ref = (ref, ref) if isinstance(ref, int) else (tuple(int(r) for r in ref) if ref else None)
    return ViTConfig(
        width=width, depth=c["depth"], heads=heads, mlp_dim=int(width * c["mlp_ratio"]),
        patch_size=square(c["patch_size"], "patch_size"), image_size=square(c["img_size"], "img_size"),
        act=SWIGLU if c["swiglu_mlp"] else "gelu", class_token=c["class_token"],
        layer_scale=c["init_values"] is not None, qkv_bias=c["qkv_bias"], key_bias=False,
        attn_norm=c["scale_attn_inner"], mlp_norm=c["scale_mlp"], rope=c["use_rot_pos_emb"],
        rope_temperature=float(c["rope_temperature"]), rope_ref_grid=ref if c["use_rot_pos_emb"] else None,
        patch_bias=not c["use_pre_transformer_norm"], pre_norm=c["use_pre_transformer_norm"], ln_eps=LN_EPS,
        pos_antialias=True, **_final_norm(arch, c["global_pool"], post_norm, fc_norm),
        **_normalisation(config, (CLIP_MEAN, CLIP_STD)))


def _eva_layout(config: dict) -> dict:
    c = _eva_kwargs(config)
    _, fc_norm = _eva_norms(c)
    return dict(no_embed_class=c["no_embed_class"], final_norm_name="fc_norm" if fc_norm else "norm",
                qkv_fused=c["qkv_fused"])


def _eva_rules(cfg: ViTConfig, p: str, no_embed_class: bool, final_norm_name: str,
               qkv_fused: bool) -> list[cv.Rule]:
    rules = _embedding_rules(cfg, no_embed_class) + cv.layernorm(final_norm_name, ("norm",))
    heads = cfg.heads
    for i in range(cfg.depth):
        h, b = f"blocks.{i}", (f"block_{i}",)
        a = b + ("attn",)
        if qkv_fused:  # one [q | k | v] weight without bias; q and v biases apart (k has none)
            rules += [cv.Rule(f"{h}.attn.qkv.weight", a + (part, "kernel"), cv.part(j, 3, cv.heads_in(heads)))
                      for j, part in enumerate(("query", "key", "value"))]
            if cfg.qkv_bias:
                rules += [cv.Rule(f"{h}.attn.q_bias", a + ("query", "bias"), cv.heads_bias(heads)),
                          cv.Rule(f"{h}.attn.v_bias", a + ("value", "bias"), cv.heads_bias(heads))]
        else:
            names = {"query": f"{h}.attn.q_proj", "key": f"{h}.attn.k_proj", "value": f"{h}.attn.v_proj"}
            for part, name in names.items():
                rules.append(cv.Rule(f"{name}.weight", a + (part, "kernel"), cv.heads_in(heads)))
                if cfg.qkv_bias and part != "key":
                    rules.append(cv.Rule(f"{name}.bias", a + (part, "bias"), cv.heads_bias(heads)))
        rules += [cv.Rule(f"{h}.attn.proj.weight", a + ("out", "kernel"), cv.heads_out(heads)),
                  cv.Rule(f"{h}.attn.proj.bias", a + ("out", "bias"))]
        if cfg.attn_norm:
            rules += cv.layernorm(f"{h}.attn.norm", a + ("norm",))
        if cfg.layer_scale:
            rules += [cv.Rule(f"{h}.gamma_1", b + ("ls1", "scale")), cv.Rule(f"{h}.gamma_2", b + ("ls2", "scale"))]
        rules += cv.layernorm(f"{h}.norm1", b + ("norm1",)) + cv.layernorm(f"{h}.norm2", b + ("norm2",))
        rules += _eva_mlp_rules(cfg, f"{h}.mlp", b + ("mlp",))
    return rules


def _eva_mlp_rules(cfg: ViTConfig, h: str, b: tuple) -> list[cv.Rule]:
    """timm's three EVA MLPs: plain Mlp; SwiGLU packed as one [gate | value] fc1 (GluMlp, no sub-LN);
    SwiGLU with separate fc1_g / fc1_x (when it has the sub-LN), fused here into one [gate | value] kernel."""
    rules = cv.linear(f"{h}.fc2", b + ("fc2",))
    if cfg.mlp_norm:
        rules += cv.layernorm(f"{h}.norm", b + ("norm",))
    if cfg.act == SWIGLU and cfg.mlp_norm:
        gate_value = (f"{h}.fc1_g", f"{h}.fc1_x")
        rules += [cv.Rule(tuple(f"{n}.weight" for n in gate_value), b + ("fc1", "kernel"),
                          lambda g, x: cv.linear_kernel(cv.concat_rows(g, x))),
                  cv.Rule(tuple(f"{n}.bias" for n in gate_value), b + ("fc1", "bias"), cv.concat_rows)]
    else:
        rules += cv.linear(f"{h}.fc1", b + ("fc1",))
    return rules


def _eva02(size: str, img: int = 224, **extra) -> dict:
    """timm's eva02_* factory arguments: SwiGLU MLP of 4 * 2/3 the width, rotary embeddings of a
    16 x 16 reference grid (224 / 14); B and L with the MLP sub-layernorm and separate q/k/v."""
    width, depth, heads = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
                           "large": (1024, 24, 16)}[size]
    return dict(img_size=img, patch_size=14, embed_dim=width, depth=depth, num_heads=heads,
                mlp_ratio=EVA02_MLP_RATIO, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16), **extra)


_SUB_LN = dict(qkv_fused=False, scale_mlp=True)
_EVA02_ARCHITECTURES = {
    "eva02_tiny_patch14_224": _eva02("tiny"),
    "eva02_small_patch14_224": _eva02("small"),
    "eva02_base_patch14_224": _eva02("base", **_SUB_LN),
    "eva02_large_patch14_224": _eva02("large", **_SUB_LN),
    "eva02_tiny_patch14_336": _eva02("tiny", 336),
    "eva02_small_patch14_336": _eva02("small", 336),
    "eva02_base_patch14_448": _eva02("base", 448, **_SUB_LN),
    "eva02_large_patch14_448": _eva02("large", 448, **_SUB_LN),
}


def _eva02_variant(size: str) -> tuple:
    """A variant-table row of an EVA-02 224 px architecture."""
    c = _EVA02_ARCHITECTURES[f"eva02_{size}_patch14_224"]
    width = c["embed_dim"]
    return (width, c["depth"], c["num_heads"], int(width * c["mlp_ratio"]), 14, 224,
            dict(mlp_norm=c.get("scale_mlp", False)))


EVA02 = Family(
    name="eva02",
    base=dict(act=SWIGLU, key_bias=False, rope=True, rope_ref_grid=(16, 16), final_norm="pooled", pool="patch_mean",
              ln_eps=LN_EPS, pos_antialias=True, mean=CLIP_MEAN, std=CLIP_STD),
    variants={
        "Ti/14": _eva02_variant("tiny"),
        "S/14": _eva02_variant("small"),
        "B/14": _eva02_variant("base"),
        "L/14": _eva02_variant("large"),
        TEST_VARIANT: TEST_SIZE + (dict(mlp_norm=True),),
    },
    model_types=(),
    architectures=_EVA02_ARCHITECTURES,
    from_hf=_eva_from_timm, rules=_eva_rules, layout=_eva_layout, anchor="patch_embed.proj.weight",
    ignored=_TIMM_IGNORED,
)

FAMILIES = (TIMM_VIT, EVA02)
