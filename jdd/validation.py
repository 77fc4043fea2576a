"""Every numeric and enum value of a run's config, checked in one table before anything is built.

    validate_config(config)   # raises ConfigError: "--config.syn.lr=-1.0: syn.lr must be ..."

The table (:data:`RULES`, and :data:`METHOD_RULES` for the selected method's ``method.*`` keys) has
one row per key: the key as a user types it after ``--config.``, what is allowed, and, where the
bound is a judgement rather than a definition, why. A few rules relate two keys (:data:`CROSS`),
and two look outside the config without loading anything heavy: the data directory
(``jdd.data.sources.check_data_dir``) and the backbone's patch size (from a ``random:`` spec or a
local config.json). Checks that need the data or the devices (``syn.ipc`` against the smallest
class, batch sizes against the device count) run where those are known, still before any compile.

A key that a config lacks is skipped, so the table may name keys a run does not have; a test checks
the converse, that every numeric and string key of ``base_config()`` and of every method has a row.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import ml_collections

# syn.init: where the images start (jdd.loop.initial_images)
INITS = ("noise", "real", "centroid", "greedy")


class ConfigError(ValueError):
    """A config value that a run cannot use; the message names the key and what is allowed."""


# ------------------------------------------------------------------------------------------------
# Predicates: (test, description of what is allowed)
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Allowed:
    test: Callable[[Any], bool]
    describe: Callable[[], str]  # read when an error is raised (registries fill up at import)

    @property
    def text(self) -> str:
        return self.describe()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: int | None = None) -> Allowed:
    text = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    return Allowed(lambda v: _is_int(v) and v >= lo and (hi is None or v <= hi), lambda: text)


def real(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False) -> Allowed:
    """A finite number in the interval; lo_open / hi_open exclude the ends."""
    def test(v):
        return (_is_real(v) and (v > lo if lo_open else v >= lo)
                and (v < hi if hi_open else v <= hi))
    if hi == math.inf:
        text = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        text = f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return Allowed(test, lambda: text)


def positive() -> Allowed:
    return real(0.0, lo_open=True)


def zero_or(other: Allowed, meaning: str) -> Allowed:
    return Allowed(lambda v: v == 0 or other.test(v), lambda: f"0 ({meaning}) or {other.text}")


def one_of(choices: Iterable[str] | Callable[[], Iterable[str]]) -> Allowed:
    """One of ``choices``; a callable (a registry) is read at check time."""
    get = choices if callable(choices) else (lambda c=tuple(choices): c)
    return Allowed(lambda v: isinstance(v, str) and v in tuple(get()),
                   lambda: "one of " + ", ".join(repr(c) for c in sorted(get())))


def unit_interval_pair() -> Allowed:
    return Allowed(lambda v: (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_real(x) for x in v)
                              and 0 < v[0] <= v[1] <= 1), lambda: "a pair (lo, hi) with 0 < lo <= hi <= 1")


# ------------------------------------------------------------------------------------------------
# Registries (imported lazily: validating a config should not import JAX models)
# ------------------------------------------------------------------------------------------------
def _method_names():
    from jdd import methods
    return methods.METHODS


def _parametrisations():
    from jdd import synsets
    return synsets.PARAMETRISATIONS


@dataclasses.dataclass(frozen=True)
class Rule:
    key: str            # dotted path after --config.
    allowed: Allowed
    why: str = ""       # why the bound is where it is, when that is a judgement


# Adam moves each parameter by about lr per step whatever the gradient's scale, and image parameters
# are logits of sigmoid(2x): with lr > 1 a few steps saturate every pixel at 0 or 1 (lr=1e30 did).
LR_WHY = "Adam moves each parameter by about lr per step; above 1 every pixel saturates; LGM uses 2e-3"
MAX_RES = 4096  # a ViT at 4096 px sees 65k+ tokens per image: far past any accelerator's memory

RULES: tuple[Rule, ...] = (
    Rule("seed", integer(0, 2**31 - 1), "NumPy seed sequences refuse negative seeds"),
    Rule("steps", integer(0), "0 evaluates the initial set"),
    Rule("budget_minutes", real(0.0), "0 = no time budget"),
    Rule("log_every", integer(1)),
    Rule("ckpt_every", integer(1)),
    Rule("keep_ckpts", integer(1)),
    Rule("png_every", integer(0), "0 = only at the end"),
    Rule("method_name", one_of(_method_names)),
    Rule("data.real_res", integer(1, MAX_RES)),
    Rule("data.crop_res", integer(1, MAX_RES)),
    Rule("data.workers", integer(0, 1024), "0 = one per core"),
    Rule("backbone.dtype", one_of(("float32", "bfloat16"))),
    Rule("backbone.feature", one_of(("embedding", "cls", "patch_mean"))),
    Rule("syn.ipc", integer(1)),
    Rule("syn.res", integer(1, MAX_RES)),
    Rule("syn.param", one_of(_parametrisations)),
    Rule("syn.extent", integer(1)),
    Rule("syn.grow_mode", one_of(("lgm", "exact"))),
    Rule("syn.init", one_of(INITS)),
    Rule("syn.greedy_candidates", integer(1), "greedy start: images per class tried in each slot"),
    Rule("syn.greedy_sweeps", integer(1)),
    Rule("syn.greedy_real_per_class", integer(1), "greedy start: training features per class the loss is scored on"),
    Rule("syn.lr", real(0.0, 1.0, lo_open=True), LR_WHY),
    Rule("syn.lr_warmup", integer(0)),
    Rule("syn.lr_decay", one_of(("none", "cosine", "linear"))),
    Rule("syn.lr_final", real(0.0, 1.0), "a fraction of the peak learning rate"),
    Rule("syn.param_lr", zero_or(real(0.0, 1.0, lo_open=True), "the method's default"), LR_WHY),
    Rule("syn.adv_lr", zero_or(real(0.0, 1.0, lo_open=True), "the method's default"), LR_WHY),
    Rule("syn.label_lr", real(0.0, 1.0, lo_open=True), "Adam moves each soft-label logit by about lr per step"),
    Rule("syn.label_init_temp", positive()),
    Rule("syn.adam_b1", real(0.0, 1.0, hi_open=True), "Adam's first-moment decay"),
    Rule("syn.adam_b2", real(0.0, 1.0, hi_open=True), "Adam's second-moment decay"),
    Rule("syn.adam_eps", positive(), "added to Adam's root second moment"),
    Rule("augment.copies", integer(1)),
    Rule("augment.accum_chunks", integer(1)),
    Rule("augment.rrc_scale", unit_interval_pair(), "the fraction of the image area a random crop keeps"),
    Rule("augment.noise_std", real(0.0)),
    Rule("augment.noise_mean", real(-1.0, 1.0), "images are in [0, 1]; the official LGM code adds noise of mean 0.5"),
    Rule("augment.token_keep", real(0.0, 1.0, lo_open=True), "the fraction of patch tokens kept; 1.0 keeps all"),
    Rule("augment.token_keep_until", integer(0), "0 = drop tokens for the whole run"),
    Rule("real.source", one_of(("backbone", "cache"))),
    Rule("real.per_class", integer(0), "0 = syn.ipc * augment.copies"),
    Rule("real.sampling", one_of(("balanced", "shuffled"))),
    Rule("real.cache_views", integer(1)),
    Rule("real.crop_res", integer(0, MAX_RES), "0 = data.crop_res"),
    Rule("parallel.num_devices", integer(0), "0 = all devices"),
    Rule("parallel.shard_state_mb", real(0.0)),
    Rule("eval.mode", one_of(("full", "features", "bank"))),
    Rule("eval.bank_views", integer(1), "bank: augmented views per image encoded once"),
    Rule("eval.epochs", integer(1)),
    Rule("eval.seeds", integer(1)),
    Rule("eval.random_draws", integer(1)),
    Rule("eval.test_batch", integer(1)),
    Rule("eval.track_every", integer(0), "0 = off"),
    Rule("eval.track_seeds", integer(1)),
    Rule("eval.track_views", integer(0), "0 = the plain features"),
    Rule("eval.track_holdout", real(0.0, 1.0, hi_open=True), "the held-out fraction of each class; 0 = none"),
    Rule("eval.holdout_seed", integer(-1), "the seed of the held-out slice; -1 = the run's seed"),
    Rule("eval.patience", integer(0), "0 = never stop early"),
    Rule("eval.min_delta", real(0.0), "top-1 points; 0 = any gain is a new best"),
    Rule("eval.progress", one_of(("bar", "log", "")), "'' = silent"),
)

# Keys whose value is free text (paths, names, lists): checked by the functions below (data.name,
# data.data_dir, backbone.spec, eval.backbone, augment.ops, eval.baseline_sets, augment.*_schedule,
# resume_allow) or where they are used (class lists, split names, the cache directory).
FREE_TEXT = ("data.name", "data.data_dir", "data.classes", "data.train_split", "data.test_split", "backbone.spec",
             "augment.ops", "augment.res_schedule", "augment.copies_schedule", "augment.rrc_scale_schedule",
             "real.cache_dir", "eval.backbone", "eval.baseline_sets", "resume_allow")

# The CLP loss and its gradients scale as 1/T (measured on random features: gradients ~8 at T=1e-4,
# ~1e27 at T=1e-30, where the backward pass through the encoder overflowed to NaN); the default is
# 0.1, so [1e-4, 1e4] leaves three orders of magnitude either way; above 1e4 the softmax is flat.
_TEMPERATURE_WHY = "the loss and its gradients scale as 1/T; T=1e-30 overflowed to NaN; the default is 0.1"
METHOD_RULES: dict[str, tuple[Rule, ...]] = {
    "clp": (Rule("method.ridge", positive(), "0 makes the ridge solve singular when features repeat"),
            Rule("method.temperature", real(1e-4, 1e4), _TEMPERATURE_WHY),
            Rule("method.outer", one_of(("ce", "mse"))),
            Rule("method.form", one_of(("auto", "dual", "primal"))),
            Rule("method.lgm_weight", real(0.0), "0 = CLP alone; > 0 adds LGM's distance times this weight"),
            Rule("method.lgm_heads", integer(1)),
            Rule("method.lgm_head_std", positive(), "a zero head has zero gradients to match")),
    "kip": (Rule("method.kernel", one_of(("linear", "rbf", "relu_nngp"))),
            Rule("method.ridge", positive(), "0 makes the kernel solve singular when features repeat"),
            Rule("method.rbf_bandwidth", positive())),
    "lgm": (Rule("method.head_std", positive(), "a zero head has zero gradients to match"),
            Rule("method.num_heads", integer(1))),
    "bptt": (Rule("method.steps", integer(1)),
             Rule("method.lr", positive()),
             Rule("method.optimizer", one_of(("adam", "sgd"))),
             Rule("method.num_inits", integer(1)),
             Rule("method.init_std", real(0.0))),
    "dc": (Rule("method.max_steps", integer(1)),
           Rule("method.lr", positive()),
           Rule("method.init_std", real(0.0)),
           Rule("method.class_chunk", integer(0), "0 = all classes at once")),
    "dm": (),
    "mtt": (Rule("method.num_experts", integer(1)),
            Rule("method.epochs", integer(1)),
            Rule("method.expert_lr", positive()),
            Rule("method.expert_batch", integer(1)),
            Rule("method.init_std", real(0.0)),
            Rule("method.syn_steps", integer(1)),
            Rule("method.expert_epochs", integer(1)),
            Rule("method.max_start_epoch", integer(1)),
            Rule("method.batch_syn", integer(0), "0 = the whole synthetic set per step"),
            Rule("method.student_lr_init", positive())),
    "ncfm": (Rule("method.num_freqs", integer(1)),
             Rule("method.alpha", real(0.0)),
             Rule("method.beta", real(0.0)),
             Rule("method.sampler", one_of(("net", "gaussian"))),
             Rule("method.t_var", positive()),
             Rule("method.scale", positive()),
             Rule("method.adv_lr", real(0.0, 1.0, lo_open=True), LR_WHY)),
    "sfm": (Rule("method.objective", one_of(("flow", "decouple"))),
            Rule("method.alpha", real(0.0, 1.0), "a weight between the own centre and the others' mean")),
}
METHOD_FREE_TEXT: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------
# Checking
# ------------------------------------------------------------------------------------------------
_MISSING = object()


def _get(config, key: str):
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            return _MISSING
    return node


def _shown(value) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shown(v) for v in value) + ")"
    return repr(value)


def refuse(key: str, value, must: str, why: str = "") -> ConfigError:
    """The one-sentence error for ``key``: ``--config.KEY=VALUE: KEY must be MUST (WHY)``."""
    return ConfigError(f"--config.{key}={_shown(value)}: {key} must be {must}" + (f" ({why})" if why else ""))


def check_rules(config, rules: Iterable[Rule]) -> None:
    for rule in rules:
        value = _get(config, rule.key)
        if value is _MISSING:
            continue
        if isinstance(value, ml_collections.FieldReference):
            value = value.get()
        if not rule.allowed.test(value):
            raise refuse(rule.key, value, rule.allowed.text, rule.why)


def _cross(config) -> None:
    """Rules that relate two keys."""
    g = lambda k: _get(config, k)  # noqa: E731
    if g("data.crop_res") is not _MISSING and g("data.crop_res") > g("data.real_res"):
        raise refuse("data.crop_res", g("data.crop_res"), f"<= data.real_res = {g('data.real_res')}",
                     "the shorter side is resized to real_res, then crop_res is cropped from it")
    real_crop = g("real.crop_res")
    if real_crop is not _MISSING and real_crop and not g("data.crop_res") <= real_crop <= g("data.real_res"):
        raise refuse("real.crop_res", real_crop, f"0 or in [data.crop_res = {g('data.crop_res')}, data.real_res = "
                     f"{g('data.real_res')}]", "the real batch is cropped from the resized image, then augmented")
    if g("real.sampling") == "shuffled" and g("real.source") != "backbone":
        raise refuse("real.sampling", "shuffled", "balanced with real.source=cache",
                     "shuffled draws the real images of real.source=backbone; the cache is sampled per class")
    if g("augment.copies") % g("augment.accum_chunks"):
        raise refuse("augment.accum_chunks", g("augment.accum_chunks"),
                     f"a divisor of augment.copies = {g('augment.copies')}", "the copies are encoded in equal chunks")
    if g("eval.keep_best") is True and not g("eval.track_every"):
        raise ConfigError("--config.eval.keep_best=True needs --config.eval.track_every > 0: the tracked probe "
                          "picks the best set")
    holdout = g("eval.track_holdout")
    if holdout not in (_MISSING, 0, 0.0):
        if not g("eval.track_every"):
            raise ConfigError(f"--config.eval.track_holdout={holdout} needs --config.eval.track_every > 0: the "
                              "held-out images are what the tracker scores on")
        if g("real.source") == "backbone":
            raise refuse("eval.track_holdout", holdout, "0 with real.source=backbone",
                         "only cached real features can leave the held-out images out of the objective; "
                         "set --config.real.source=cache")
    patience = g("eval.patience")
    if patience is not _MISSING and patience and not g("eval.track_every"):
        raise ConfigError(f"--config.eval.patience={patience} needs --config.eval.track_every > 0: it counts "
                          "tracks without a new best")
    if g("eval.min_delta") not in (_MISSING, 0, 0.0) and not patience:
        raise ConfigError(f"--config.eval.min_delta={g('eval.min_delta')} needs --config.eval.patience > 0: it "
                          "is the gain a track needs to reset the patience")
    if g("syn.learn_images") is False and g("syn.learn_labels") is False:
        raise ConfigError("--config.syn.learn_images=False leaves nothing to learn: set --config.syn.learn_labels="
                          "True (the label-only baseline) or learn the images")
    allow = g("resume_allow")
    if allow is not _MISSING and allow:
        unknown = [k for k in names(allow) if _get(config, k) is _MISSING]
        if unknown:
            raise refuse("resume_allow", allow, "a comma-separated list of config keys (e.g. syn.lr)",
                         f"no such key: {', '.join(unknown)}")
    if g("method_name") == "mtt":
        need = g("method.max_start_epoch") - 1 + g("method.expert_epochs")
        if need > g("method.epochs"):
            raise refuse("method.epochs", g("method.epochs"), f">= method.max_start_epoch - 1 + "
                         f"method.expert_epochs = {need}", "the target trajectory must exist")


def names(text: str) -> tuple[str, ...]:
    """The items of a comma-separated config list (``"flip, rrc,"`` -> ``("flip", "rrc")``)."""
    return tuple(t.strip() for t in str(text).split(",") if t.strip())


def _check_names(config, key: str, known) -> None:
    """``key`` (a comma-separated list) names only items of ``known``."""
    text = _get(config, key)
    if text is _MISSING:
        return
    unknown = [n for n in names(text) if n not in known]
    if unknown:
        raise refuse(key, text, f"a comma-separated list of {', '.join(sorted(known))}",
                     f"unknown: {', '.join(unknown)}")


def _check_lists(config, mode: str) -> None:
    from jdd import augment, baselines
    _check_names(config, "augment.ops", augment.OPS)
    _check_names(config, "eval.baseline_sets", baselines.NAMES)
    wanted = _get(config, "eval.baseline_sets")
    if mode == "baselines" and wanted is not _MISSING and "neighbour" in names(wanted):
        raise refuse("eval.baseline_sets", wanted, "random, centroid or full with --mode=baselines",
                     "neighbour is the real images nearest a distilled set, and this mode scores none: "
                     "use --mode=eval")


def _schedule(config, key: str, parse, must: str) -> tuple:
    """``key``'s parsed ``VALUE:UNTIL_STEP`` schedule (refused, saying it ``must`` be, when malformed); ()
    when absent or empty."""
    text = _get(config, key)
    if text is _MISSING or not text:
        return ()
    try:
        return parse(text)
    except ValueError as err:
        raise refuse(key, text, must, str(err)) from None


def _res_schedule(config) -> list[int]:
    """The crop resolutions of ``augment.res_schedule`` (checked), [] when it is absent or empty."""
    from jdd import step as step_lib
    schedule = _schedule(config, "augment.res_schedule", step_lib.parse_res_schedule,
                         "RES:UNTIL_STEP items with increasing steps, e.g. '56:300'")
    crop = _get(config, "data.crop_res")
    text = _get(config, "augment.res_schedule")
    for _, res in schedule:
        if not 1 <= res <= crop:
            raise refuse("augment.res_schedule", text, f"resolutions in [1, data.crop_res = {crop}]")
    return [res for _, res in schedule]


def _step_schedules(config) -> None:
    """``augment.copies_schedule`` and ``augment.rrc_scale_schedule``: well formed, and each value one the
    step can take (copies a multiple of accum_chunks; a crop scale within (0, rrc_scale[1]])."""
    from jdd import step as step_lib
    key = "augment.copies_schedule"
    chunks = _get(config, "augment.accum_chunks")
    for _, copies in _schedule(config, key, step_lib.parse_copies_schedule,
                               "VALUE:UNTIL_STEP items with increasing steps, e.g. '1:100'"):
        if copies < 1 or copies % chunks:
            raise refuse(key, _get(config, key), f"copies >= 1 and multiples of augment.accum_chunks = {chunks}",
                         f"{copies} is not; the copies are encoded in equal chunks")
    key = "augment.rrc_scale_schedule"
    for _, lo in _schedule(config, key, step_lib.parse_rrc_scale_schedule,
                           "VALUE:UNTIL_STEP items with increasing steps, e.g. '0.8:100'"):
        hi = _get(config, "augment.rrc_scale")[1]
        if not 0 < lo <= hi:
            raise refuse(key, _get(config, key), f"area fractions in (0, augment.rrc_scale[1] = {hi}]",
                         f"{lo} is not; it is the smallest area a crop keeps before that step")


def _check_data(config) -> None:
    from jdd.data import sources
    name, data_dir = _get(config, "data.name"), _get(config, "data.data_dir")
    try:
        sources.check_data_dir(name, data_dir or None)
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from None
    if not data_dir and name != "imagefolder" and not sources.is_tfds_name(name):
        raise refuse("data.name", name, f"'imagefolder', 'tfds:<builder>' or one of {', '.join(sources.TFDS_NAMES)}",
                     "or pass an ImageFolder root as the config's data= argument")
    if name == "imagefolder" and not data_dir:
        raise ConfigError("--config.data.name='imagefolder' needs --config.data.data_dir: the root of "
                          "ROOT/train/<class>/*.jpg")


def backbone_patch_size(spec: str, key: str = "backbone.spec") -> tuple[int | None, str]:
    """(patch size, name) of a backbone spec without loading weights; None for a hub name.

    ``random:FAMILY/VARIANT`` reads the variant table; a local checkpoint directory its config.json.
    Raises a one-sentence error for an unknown family or variant, or a missing or malformed
    config.json (naming the file).
    """
    from jdd import backbones
    from jdd.backbones import hub
    if not spec:
        raise ConfigError(f"--config.{key}='': pass a checkpoint directory, a hub name, or random:FAMILY/VARIANT")
    if spec.startswith("random:"):
        family, _, variant = spec[len("random:"):].partition("/")
        try:
            return backbones.FAMILIES[family].config(variant).patch_size, spec
        except KeyError:
            raise refuse(key, spec, "a checkpoint directory, a hub name, or random:FAMILY/VARIANT "
                         f"with FAMILY one of {', '.join(sorted(backbones.FAMILIES))}",
                         f"unknown backbone family {family!r}") from None
        except ValueError as err:
            raise ConfigError(f"--config.{key}={spec!r}: {err}") from None
    if not hub.is_local(spec):
        return None, spec
    try:
        directory = hub.resolve(spec)  # a local path: no network
    except FileNotFoundError as err:
        raise ConfigError(f"--config.{key}={spec!r}: {err}") from None
    return backbones.config_of(directory).patch_size, spec


def _check_patch(config) -> None:
    sizes = [("data.crop_res", _get(config, "data.crop_res"))]
    sizes += [("augment.res_schedule", res) for res in _res_schedule(config)]
    for spec_key in ("backbone.spec", "eval.backbone"):
        spec = _get(config, spec_key)
        if spec is _MISSING or not spec:
            continue
        patch, name = backbone_patch_size(spec, spec_key)
        for key, size in sizes:
            if patch and size % patch:
                lo, hi = max(patch, size // patch * patch), (size // patch + 1) * patch
                nearest = " or ".join(str(n) for n in sorted({lo, hi}))
                shown = size if key == "data.crop_res" else _get(config, key)
                raise refuse(key, shown, f"{'a multiple' if key == 'data.crop_res' else 'made of multiples'} of "
                             f"the patch size {patch} of {name}", f"{size} is not; nearest: {nearest}")


def validate_config(config: ml_collections.ConfigDict, *, check_paths: bool = True, mode: str = "distill") -> None:
    """Raises ConfigError (one sentence naming the key) for the first value a run cannot use.

    Every row of RULES and of the selected method's METHOD_RULES, the cross-key rules, the
    augmentation and baseline names (against the run's ``mode``), and, with ``check_paths``, the data
    directory and the backbone's patch size (file system reads only; nothing is loaded or compiled).
    """
    check_rules(config, RULES)
    check_rules(config, METHOD_RULES.get(_get(config, "method_name"), ()))
    _cross(config)
    _check_lists(config, mode)
    _res_schedule(config)
    _step_schedules(config)
    if check_paths:
        _check_data(config)
        _check_patch(config)


def uncovered_keys(config: ml_collections.ConfigDict, method: str | None = None) -> list[str]:
    """Numeric and string keys of ``config`` that no rule (nor FREE_TEXT) covers: for the coverage test."""
    covered = {r.key for r in RULES} | set(FREE_TEXT)
    if method is not None:
        covered |= {r.key for r in METHOD_RULES.get(method, ())} | set(METHOD_FREE_TEXT)
    out = []

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, ml_collections.ConfigDict):
                walk(v, key + ".")
            elif not isinstance(v, bool) and isinstance(v, (int, float, str, tuple, list)) and key not in covered:
                out.append(key)
    walk(config, "")
    return sorted(out)


__all__ = ["ConfigError", "METHOD_RULES", "RULES", "Rule", "backbone_patch_size", "uncovered_keys",
           "validate_config"]
