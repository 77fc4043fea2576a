"""The distillation engine end to end: determinism, resume, devices, CLI, clear errors."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import chex
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import load_tiny_config, make_imagefolder
from jdd import distill

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.py")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """4 classes of coloured noise images (ImageFolder), separable by their mean colour."""
    return make_imagefolder(tmp_path_factory.mktemp("tiny_imagefolder"), counts={"train": 6, "val": 3}, seed=0)


def _load_tiny():
    return load_tiny_config()


def images_of(workdir):
    with np.load(os.path.join(workdir, "distilled.npz")) as f:
        return f["images"], f["labels"]


def test_run_writes_outputs_and_is_deterministic(tiny_data, tmp_path):
    cfg = _load_tiny().get_config(f"data={tiny_data},steps=4")
    distill.run(cfg, str(tmp_path / "a"))
    distill.run(cfg, str(tmp_path / "b"))
    a, labels = images_of(tmp_path / "a")
    b, _ = images_of(tmp_path / "b")
    assert a.shape == (4, 32, 32, 3) and labels.tolist() == [0, 1, 2, 3]
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    for name in ("distilled.png", "loss.png", "metrics.jsonl"):
        assert (tmp_path / "a" / name).exists(), name
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("method,source,param", [("clp", "cache", "pyramid"), ("lgm", "backbone", "pixels")])
def test_stop_and_resume_equals_uninterrupted(tiny_data, tmp_path, method, source, param):
    tiny = _load_tiny()
    common = f"data={tiny_data},method={method},source={source},param={param}"
    distill.run(tiny.get_config(common + ",steps=6"), str(tmp_path / "full"))
    # "Killed" after step 3's checkpoint (ckpt_every=2 -> the latest is step 2; a forced final save at 3).
    distill.run(tiny.get_config(common + ",steps=3"), str(tmp_path / "resumed"))
    distill.run(tiny.get_config(common + ",steps=6"), str(tmp_path / "resumed"))
    full, _ = images_of(tmp_path / "full")
    resumed, _ = images_of(tmp_path / "resumed")
    np.testing.assert_allclose(resumed, full, rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == [2, 3, 4, 6]


def _checkpoint_steps(workdir) -> list[int]:
    ckpts = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical(tiny_data, tmp_path):
    """SIGKILL a running `python -m jdd.main` between checkpoints; rerunning the same command resumes
    from the last checkpoint and ends with exactly the uninterrupted run's set and metrics."""
    import signal
    import time
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    steps = 400  # long enough to be caught mid-run (a tiny step takes milliseconds)

    def cmd(workdir):
        return [sys.executable, "-m", "jdd.main", f"--config={TINY}:data={tiny_data},steps={steps}",
                f"--workdir={workdir}", "--config.ckpt_every=20", "--config.log_every=20"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = subprocess.run(cmd(full), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = subprocess.Popen(cmd(killed), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and run.poll() is None and not any(s >= 60 for s in _checkpoint_steps(killed)):
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "distilled.npz").exists()
    assert 60 <= max(_checkpoint_steps(killed)) < steps
    proc = subprocess.run(cmd(killed), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step" in proc.stderr
    a, b = images_of(full), images_of(killed)
    np.testing.assert_array_equal(a[0], b[0])
    rows = {w: [json.loads(line) for line in open(w / "metrics.jsonl")] for w in (full, killed)}
    # Metrics are appended once per step across the kill and the resume, with the same losses.
    assert [r["step"] for r in rows[killed]] == [r["step"] for r in rows[full]]
    assert [r["loss"] for r in rows[killed]] == [r["loss"] for r in rows[full]]


@pytest.mark.slow
def test_resume_with_a_different_config_is_refused(tiny_data, tmp_path):
    tiny = _load_tiny()
    distill.run(tiny.get_config(f"data={tiny_data},steps=2"), str(tmp_path))
    with pytest.raises(ValueError, match="different config"):
        distill.run(tiny.get_config(f"data={tiny_data},steps=4,method=dm"), str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("source", ["cache", "backbone"])
def test_one_and_four_devices_agree(tiny_data, tmp_path, source):
    import jax
    assert len(jax.devices()) >= 4, "conftest forces 4 host devices (XLA_FLAGS); the setting was lost"
    tiny = _load_tiny()
    out = {}
    for n in (0, 1, 4):  # 0: the start (steps=0, one device), to check that the images moved
        steps = 3 if n else 0
        distill.run(tiny.get_config(f"data={tiny_data},steps={steps},devices={max(n, 1)},source={source}"),
                    str(tmp_path / str(n)))
        out[n], _ = images_of(tmp_path / str(n))
    np.testing.assert_allclose(out[4], out[1], rtol=0, atol=2e-5)
    assert np.abs(out[1] - out[0]).max() > 1e-3, "the images did not move in 3 steps"


@pytest.mark.slow
@pytest.mark.parametrize("method,source", [("clp", "cache"), ("lgm", "backbone")])
def test_gradient_accumulation_is_exact(tiny_data, tmp_path, method, source):
    """Encoding the copies in 2 chunks (two passes) gives the same images as one pass."""
    tiny = _load_tiny()
    out = {}
    for k in (1, 2):
        distill.run(tiny.get_config(f"data={tiny_data},steps=3,chunks={k},method={method},source={source}"),
                    str(tmp_path / str(k)))
        out[k], _ = images_of(tmp_path / str(k))
    np.testing.assert_allclose(out[2], out[1], rtol=0, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["centroid", "greedy"])
def test_centroid_and_greedy_init_start_from_their_real_images(tiny_data, tmp_path, init):
    from jdd import context, data, selection
    from jdd.methods import clp
    cfg = _load_tiny().get_config(f"data={tiny_data},steps=0,init={init}")
    distill.run(cfg, str(tmp_path / "wd"))
    images, _ = images_of(tmp_path / "wd")
    ctx = context.build(cfg, str(tmp_path / "wd"))
    cache = distill.train_cache(ctx)
    idx = selection.centroid_indices(cache.view(0), cache.labels, 4, 1)
    if init == "greedy":  # the tiny run's method is CLP: its own settings
        loss = clp.set_loss_fn(cache.view(0), cache.labels, 4, 1, ctx.spec.method_cfg,
                               real_per_class=cfg.syn.greedy_real_per_class, seed=cfg.seed)
        start, idx = idx, selection.greedy_indices(cache.view(0), cache.labels, 4, 1, loss, start=idx,
                                                   candidates=cfg.syn.greedy_candidates)
        feats = np.asarray(cache.view(0))
        assert float(loss(feats[idx][None])[0]) <= float(loss(feats[start][None])[0])
        assert np.any(idx != start)  # on this data the search moves picks: the images below test that
    want = data.load_images(ctx.train, idx, real_res=36, crop_res=32)
    np.testing.assert_allclose(images, np.clip(want, 1e-3, 1 - 1e-3), atol=1e-4)


@pytest.mark.slow
def test_learned_soft_labels_are_exported(tiny_data, tmp_path):
    distill.run(_load_tiny().get_config(f"data={tiny_data},steps=2,learn_labels=true,method=bptt"), str(tmp_path))
    with np.load(tmp_path / "distilled.npz") as f:
        soft = f["soft_labels"]
    assert soft.shape == (4, 4)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
    assert not np.allclose(soft, np.eye(4))  # the labels moved


def test_bad_input_fails_before_compiling(tiny_data, tmp_path):
    tiny = _load_tiny()
    cfg = tiny.get_config(f"data={tiny_data}")
    with cfg.unlocked():
        cfg.data.crop_res = 30  # not a multiple of the patch size 8
    with pytest.raises(ValueError, match="multiple"):
        distill.run(cfg, str(tmp_path / "a"))
    cfg = tiny.get_config(f"data={tiny_data},devices=3")  # 2 copies x 4 images over 3 devices
    with pytest.raises(ValueError, match="divisible"):
        distill.run(cfg, str(tmp_path / "b"))
    cfg = tiny.get_config(f"data={tiny_data}")
    cfg.syn.init, cfg.syn.ipc = "real", 7
    with pytest.raises(ValueError, match="has only 6"):
        distill.run(cfg, str(tmp_path / "c"))
    with pytest.raises(KeyError, match="unknown distillation method"):
        tiny.get_config(f"data={tiny_data},method=nope")


def test_unknown_config_key_is_an_error(tiny_data):
    cfg = _load_tiny().get_config(f"data={tiny_data}")
    with pytest.raises(AttributeError):
        cfg.syn.ipcc = 2


@pytest.mark.slow
def test_cli_end_to_end(tiny_data, tmp_path):
    """python -m jdd.main with a tiny ViT and tiny data: distil, evaluate, then --mode=eval again."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "jdd.main", f"--config={TINY}:data={tiny_data},evaluate=true",
           f"--workdir={tmp_path}", "--config.steps=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(tmp_path / "results.json"))["results"]
    (name, res), = results.items()
    assert name == "distilled (clp)" and len(res["top1_per_seed"]) == 2
    assert res["protocol"]["mode"] == "features"
    proc = subprocess.run(cmd[:-1] + ["--mode=eval"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.load(open(tmp_path / "results.json"))["results"]["distilled (clp)"]
    assert again["top1_per_seed"] == res["top1_per_seed"]
    bad = subprocess.run(cmd[:-1] + ["--config.syn.ipcc=3"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert bad.returncode != 0 and "ipcc" in bad.stderr


@pytest.mark.slow
def test_tracking_keeps_the_best_set_on_the_train_split(tiny_data, tmp_path):
    """eval.track_every logs the train-split probe; keep_best exports the set of the best tracked step."""
    from jdd import context, evaluators, export
    cfg = _load_tiny().get_config(f"data={tiny_data},steps=6")
    with cfg.unlocked():
        cfg.eval.track_every, cfg.eval.keep_best = 2, True
    distill.run(cfg, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    tracked = {r["step"]: r["track_top1"] for r in rows if "track_top1" in r}
    assert sorted(tracked) == [0, 2, 4, 6]
    best = json.load(open(tmp_path / "best.json"))
    assert best["top1"] == max(tracked.values())
    assert best["step"] == min(s for s, v in tracked.items() if v == best["top1"])  # first of equals
    images, labels = images_of(tmp_path)
    # The exported set is the kept one, and re-scoring it gives the tracked number.
    np.testing.assert_array_equal(images, export.load_npz(tmp_path / "best.npz")["images"])
    ctx = context.build(cfg, str(tmp_path))
    cache = distill.train_cache(ctx)
    track = evaluators.tracker(
        distill.jax.random.fold_in(distill.jax.random.PRNGKey(cfg.seed), 2 << 20), cache.view(0), cache.labels,
        ctx.embed, num_classes=4, cfg=evaluators.probe_config(cfg.eval, cfg.data.crop_res),
        seeds=cfg.eval.track_seeds)
    assert track(images, labels) == pytest.approx(best["top1"], abs=1e-6)


@pytest.mark.slow
def test_augmented_tracker_trains_on_fixed_protocol_views():
    """eval.track_views = V: the tracking probe trains on V protocol-augmented views of each image
    (view-major, the same keys at every track) for epochs / V passes; V = 0 is the plain tracker."""
    import jax
    import jax.numpy as jnp
    from jdd import backbones, context, evaluators, probe
    from jdd import config as jc
    embed = context.embedder(backbones.create("dinov2", "test"), "embedding")
    rng = np.random.default_rng(0)
    images, labels = rng.random((4, 32, 32, 3)).astype(np.float32), np.arange(4)
    cfg = evaluators.probe_config(jc.base_config().eval, 24)   # views are cropped to 24 px
    cfg.epochs = 8
    augment_fn = probe.default_augment_fn(cfg)
    keys = jax.random.split(jax.random.PRNGKey(3), 8)
    views = evaluators.embed_views(augment_fn, embed, jnp.asarray(images), keys, batch=3)
    manual = embed(jax.vmap(augment_fn)(keys, jnp.asarray(images)[np.arange(8) % 4]))
    np.testing.assert_allclose(views, manual, rtol=1e-5, atol=1e-5)

    plain_feats = probe.embed_images(embed, jnp.asarray(evaluators.resize(images, 24)))
    train = np.concatenate([plain_feats, views]) + 0.01 * rng.normal(size=(12, views.shape[1]))
    train_labels = np.concatenate([labels, labels, labels])
    key = jax.random.PRNGKey(5)
    track = lambda v: evaluators.tracker(key, train, train_labels, embed, num_classes=4, cfg=cfg,  # noqa: E731
                                         seeds=2, views=v)
    fcfg = ml_collections.ConfigDict(cfg.to_dict())
    fcfg.mode, fcfg.seeds, fcfg.progress = "features", 2, ""
    want = probe.evaluate_features(key, plain_feats, labels, train, train_labels, num_classes=4, cfg=fcfg)
    assert track(0)(images, labels) == pytest.approx(want["top1_mean"])
    aug = track(2)
    k_views = jax.random.split(jax.random.fold_in(key, 1), 8)
    fcfg.epochs = 4
    want = probe.evaluate_features(key, evaluators.embed_views(augment_fn, embed, jnp.asarray(images), k_views,
                                                              batch=256),
                                   np.tile(labels, 2), train, train_labels, num_classes=4, cfg=fcfg)
    assert aug(images, labels) == pytest.approx(want["top1_mean"]) == aug(images, labels)


def test_keep_best_without_tracking_is_refused(tiny_data, tmp_path):
    cfg = _load_tiny().get_config(f"data={tiny_data}")
    with cfg.unlocked():
        cfg.eval.keep_best = True
    with pytest.raises(ValueError, match="track_every"):
        distill.run(cfg, str(tmp_path))


@pytest.mark.slow
def test_label_only_baseline_keeps_the_images(tiny_data, tmp_path):
    """syn.learn_images=False with soft labels: images stay the real init, labels move."""
    cfg = _load_tiny().get_config(f"data={tiny_data},steps=3,learn_labels=true,init=real,method=bptt")
    with cfg.unlocked():
        cfg.syn.learn_images = False
    distill.run(cfg, str(tmp_path / "labels"))
    cfg0 = _load_tiny().get_config(f"data={tiny_data},steps=0,learn_labels=true,init=real,method=bptt")
    distill.run(cfg0, str(tmp_path / "start"))
    np.testing.assert_array_equal(images_of(tmp_path / "labels")[0], images_of(tmp_path / "start")[0])
    with np.load(tmp_path / "labels" / "distilled.npz") as f, np.load(tmp_path / "start" / "distilled.npz") as g:
        assert np.abs(f["soft_labels"] - g["soft_labels"]).max() > 1e-4  # the labels moved
    with cfg.unlocked():
        cfg.syn.learn_labels = False
    with pytest.raises(ValueError, match="nothing to learn"):
        distill.run(cfg, str(tmp_path / "bad"))


@pytest.mark.slow
def test_budget_stops_at_a_logging_step_and_exports(tiny_data, tmp_path):
    cfg = _load_tiny().get_config(f"data={tiny_data},steps=6")
    cfg.budget_minutes = 1e-9  # already spent at the first logging step (log_every = 2)
    distill.run(cfg, str(tmp_path))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [2]
    assert (tmp_path / "distilled.npz").exists()
    assert sorted(os.listdir(tmp_path / "checkpoints"))[-1].endswith("2")


@pytest.mark.slow
def test_sfm_needs_no_real_batch(tiny_data, tmp_path):
    """A method with needs_real=False (SFM: class statistics prepared once from the cache) runs with no
    real input to the step at all, and moves the images."""
    from jdd import context, loop, step as step_lib
    tiny = _load_tiny()
    cfg = tiny.get_config(f"data={tiny_data},steps=3,method=sfm")
    ctx = context.build(cfg, str(tmp_path / "probe"))
    assert ctx.spec.real_source == "none"
    state = step_lib.init_state(distill.jax.random.PRNGKey(0), ctx.spec, method=ctx.method,
                                feat_dim=ctx.backbone.embed_dim, init_images=None)
    consts = ctx.method.prepare(distill.jax.random.PRNGKey(1), *_prepared_inputs(ctx), ctx.spec.num_classes,
                                ctx.spec.method_cfg)
    step = loop.jitted_step(ctx.spec, ctx.method, ctx.mesh, ctx.embed, donate=False)
    _, metrics = step(state, consts, ctx.backbone.params, {})  # no real batch, no cache arrays
    assert np.isfinite(float(metrics["loss"])) and float(metrics["finite"]) == 1.0
    distill.run(cfg, str(tmp_path / "sfm"))
    distill.run(tiny.get_config(f"data={tiny_data},steps=0,method=sfm"), str(tmp_path / "start"))
    assert np.abs(images_of(tmp_path / "sfm")[0] - images_of(tmp_path / "start")[0]).max() > 1e-3


def _prepared_inputs(ctx):
    cache = distill.train_cache(ctx)
    return cache.view(0), cache.labels


@pytest.mark.slow
def test_coarse_to_fine_compiles_one_step_per_resolution(tiny_data, tmp_path):
    """augment.res_schedule: crops at 16 px before step 2, then at crop_res (32); bad items are refused."""
    from jdd import step as step_lib
    tiny = _load_tiny()
    cfg = tiny.get_config(f"data={tiny_data},steps=4")
    cfg.augment.res_schedule = "16:2"
    spec = step_lib.make_spec(cfg, 4, distill.context.methods.get("clp"))
    assert [spec.at_step(t).crop_res for t in range(4)] == [16, 16, 32, 32]
    distill.run(cfg, str(tmp_path / "c2f"))
    distill.run(tiny.get_config(f"data={tiny_data},steps=4"), str(tmp_path / "plain"))
    a, b = images_of(tmp_path / "c2f")[0], images_of(tmp_path / "plain")[0]
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-4  # the low-resolution steps took another path
    cfg.augment.res_schedule = "12:2"  # not a multiple of the tiny ViT's patch (8)
    with pytest.raises(ValueError, match="res_schedule.*multiples of the patch size 8"):
        distill.run(cfg, str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="RES:UNTIL_STEP"):
        step_lib.parse_res_schedule("16-2")


@pytest.mark.slow
def test_copies_and_crop_scale_schedules(tiny_data, tmp_path):
    """augment.copies_schedule / rrc_scale_schedule resolve per step (after the last item: copies and
    rrc_scale); a run with 1 copy and near-full crops early takes another path; bad items are refused."""
    from jdd import step as step_lib
    tiny = _load_tiny()
    cfg = tiny.get_config(f"data={tiny_data},steps=4,param=pixels")
    cfg.augment.ops, cfg.augment.rrc_scale = "flip,rrc", (0.3, 1.0)
    cfg.augment.copies_schedule, cfg.augment.rrc_scale_schedule = "1:2", "0.9:1,0.6:3"
    spec = step_lib.make_spec(cfg, 4, distill.context.methods.get("clp"))
    resolved = [spec.at_step(t) for t in range(4)]
    assert [s.copies for s in resolved] == [1, 1, 2, 2]
    assert [dict(s.aug_opts)["rrc_scale"] for s in resolved] == [(0.9, 1.0), (0.6, 1.0), (0.6, 1.0), (0.3, 1.0)]
    assert resolved[3] == dataclasses.replace(spec, copies_schedule=(), rrc_scale_schedule=())
    assert {s.real_per_class for s in resolved} == {spec.real_per_class}  # the real batch keeps its size
    distill.run(cfg, str(tmp_path / "scheduled"))
    cfg.augment.copies_schedule, cfg.augment.rrc_scale_schedule = "", ""
    distill.run(cfg, str(tmp_path / "plain"))
    a, b = images_of(tmp_path / "scheduled")[0], images_of(tmp_path / "plain")[0]
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-4
    with pytest.raises(ValueError, match="COPIES:UNTIL_STEP"):
        step_lib.parse_copies_schedule("1-100")
    with pytest.raises(ValueError, match="steps must increase"):
        step_lib.parse_rrc_scale_schedule("0.9:5,0.5:5")


def test_adam_settings_reach_every_optimiser(tiny_data):
    """syn.adam_b1 / adam_b2 / adam_eps: the images' optimiser is optax's Adam with those settings (two
    updates, so the moment decays matter) and they differ from the defaults' updates."""
    import optax
    from jdd import step as step_lib
    cfg = _load_tiny().get_config(f"data={tiny_data}")
    grads = [{"syn": {"x": jnp.asarray(np.random.default_rng(i).normal(size=(3, 4)), jnp.float32)},
              "labels": {}, "method": {}} for i in range(2)]

    def updates(tx, tree):
        state, out = tx.init(tree[0]), []
        for g in tree:
            u, state = tx.update(g, state)
            out.append(u)
        return out

    method = distill.context.methods.get("lgm")
    default = updates(step_lib.make_optimizers(step_lib.make_spec(cfg, 4, method))[0], grads)
    cfg.syn.adam_b1, cfg.syn.adam_b2, cfg.syn.adam_eps = 0.5, 0.9, 1e-3
    spec = step_lib.make_spec(cfg, 4, method)
    assert spec.adam == (0.5, 0.9, 1e-3)
    mine = updates(step_lib.make_optimizers(spec)[0], grads)
    want = updates(optax.adam(spec.syn_lr, b1=0.5, b2=0.9, eps=1e-3), [g["syn"] for g in grads])
    for u, w in zip(mine, want):
        chex.assert_trees_all_close(u["syn"], w, rtol=1e-6)
    assert not np.allclose(mine[1]["syn"]["x"], default[1]["syn"]["x"], rtol=1e-3)


def _run_tiny(tiny, tmp_path, name, arg, **augment):
    cfg = tiny.get_config(arg)
    for key, value in augment.items():
        cfg.augment[key] = value
    distill.run(cfg, str(tmp_path / name))
    return images_of(tmp_path / name)[0]


@pytest.mark.slow
def test_token_dropping_step(tiny_data, tmp_path):
    """augment.token_keep: a schedule resolved per step (one compile per fraction); the dropped steps take
    another path than the full-token ones; per-image keys make 1 and 4 devices and 2 chunks agree."""
    from jdd import step as step_lib
    tiny = _load_tiny()
    cfg = tiny.get_config(f"data={tiny_data},steps=4")
    cfg.augment.token_keep, cfg.augment.token_keep_until = 0.5, 2
    spec = step_lib.make_spec(cfg, 4, distill.context.methods.get("clp"))
    assert [spec.at_step(t).token_keep for t in range(4)] == [0.5, 0.5, 1.0, 1.0]
    assert spec.at_step(3) == dataclasses.replace(spec, token_keep=1.0, token_keep_until=0)
    arg = f"data={tiny_data},steps=3,param=pixels,source=cache"
    plain = _run_tiny(tiny, tmp_path, "plain", arg)
    one = _run_tiny(tiny, tmp_path, "one", arg + ",devices=1", token_keep=0.5)
    four = _run_tiny(tiny, tmp_path, "four", arg + ",devices=4", token_keep=0.5)
    chunked = _run_tiny(tiny, tmp_path, "chunked", arg + ",devices=1,chunks=2", token_keep=0.5)
    assert np.isfinite(one).all() and np.abs(one - plain).max() > 1e-4
    np.testing.assert_allclose(four, one, rtol=0, atol=2e-5)
    np.testing.assert_allclose(chunked, one, rtol=0, atol=2e-5)


@pytest.mark.slow
def test_non_finite_loss_stops_before_any_checkpoint_of_it(tiny_data, tmp_path, monkeypatch):
    """Finite checkpoints at steps 2 and 4; resumed with a temperature that overflows the loss, the run
    stops at the next checkpoint step (6, not a logging step) without writing it, keeps step 4 and says
    how to continue; continuing with the old value from step 4 works."""
    import orbax.checkpoint as ocp
    from jdd import loop, validation
    # Validation refuses such a temperature up front; switched off here to reach the loop's guard.
    monkeypatch.setattr(validation, "validate_config", lambda *a, **k: None)
    tiny = _load_tiny()
    distill.run(tiny.get_config(f"data={tiny_data},steps=4"), str(tmp_path))
    assert _checkpoint_steps(tmp_path) == [2, 4]
    cfg = tiny.get_config(f"data={tiny_data},steps=8")
    cfg.log_every = 4
    cfg.method.temperature = 1e-30  # logits / T overflow: the loss is not finite from step 5 on
    cfg.resume_allow = "method.temperature"
    with pytest.raises(loop.NonFiniteError, match=r"between steps 4 and 6.*checkpoint of step 4.*resume_allow"):
        distill.run(cfg, str(tmp_path))
    assert _checkpoint_steps(tmp_path) == [2, 4]
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(tmp_path / "checkpoints" / "4" / "state")
    assert all(np.isfinite(np.asarray(x)).all() for x in distill.jax.tree.leaves(state)
               if np.issubdtype(np.asarray(x).dtype, np.floating))
    # Without resume_allow the changed value is refused, naming the key and the way to allow it.
    cfg.resume_allow = ""
    with pytest.raises(ValueError, match="method.temperature.*resume_allow"):
        distill.run(cfg, str(tmp_path))
    distill.run(tiny.get_config(f"data={tiny_data},steps=8"), str(tmp_path))
    assert _checkpoint_steps(tmp_path)[-1] == 8


def test_lr_scale_shapes():
    from jdd.loop import lr_scale
    assert [lr_scale("none", p) for p in (0.0, 0.7, 1.0)] == [1.0, 1.0, 1.0]
    np.testing.assert_allclose([lr_scale("cosine", p) for p in (0.0, 0.5, 1.0, 1.5)], [1.0, 0.5, 0.0, 0.0],
                               atol=1e-12)
    np.testing.assert_allclose([lr_scale("linear", p, 0.1) for p in (-1.0, 0.0, 0.5, 1.0)], [1.0, 1.0, 0.55, 0.1])
    np.testing.assert_allclose(lr_scale("cosine", 0.25, 0.2), 0.2 + 0.8 * 0.5 * (1 + np.cos(np.pi / 4)))


def test_budget_progress_follows_the_clock(monkeypatch):
    """With a budget, progress is the larger of the step fraction and the share of the loop's time
    spent; the clock part moves only when refreshed (on logging steps) and ignores time spent before
    the loop started (cache builds)."""
    from jdd import loop
    now = [1000.0]
    monkeypatch.setattr(loop.time, "time", lambda: now[0])
    sched = loop.Schedule(steps=100, log_every=10, ckpt_every=0, keep_ckpts=1, png_every=0, budget_minutes=10.0,
                          track_every=0, keep_best=False, patience=0, lr_decay="cosine")
    prog = loop.RunProgress(sched, t_start=1000.0 - 120.0)  # 2 of the 10 minutes went on caches
    assert prog(10) == pytest.approx(0.1)
    now[0] += 240.0  # half of the 8 minutes the loop had
    assert prog(10) == pytest.approx(0.1)  # not refreshed yet
    prog.refresh_clock()
    assert prog(10) == pytest.approx(0.5) and prog(80) == pytest.approx(0.8)
    unbudgeted = loop.RunProgress(dataclasses.replace(sched, budget_minutes=0.0), t_start=0.0)
    unbudgeted.refresh_clock()
    assert unbudgeted(25) == pytest.approx(0.25)


@pytest.mark.slow
@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_lr_decay_scales_every_update_and_resumes_exactly(tiny_data, tmp_path, decay):
    """syn.lr_decay: the logged multiplier of step t is the decay at t / steps; a zero multiplier
    leaves the images where they are; a run stopped by its budget (at step 2) and resumed with no
    budget reproduces the uninterrupted decayed run (the horizon is `steps`, so the interruption
    must not change it)."""
    from jdd import context, loop, step as step_lib
    tiny = _load_tiny()

    def cfg(steps):
        c = tiny.get_config(f"data={tiny_data},steps={steps}")
        c.syn.lr_decay, c.syn.lr_final = decay, 0.1
        return c
    distill.run(cfg(6), str(tmp_path / "full"))
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    np.testing.assert_allclose([r["lr_scale"] for r in rows], [loop.lr_scale(decay, t / 6, 0.1) for t in (1, 3, 5)],
                               rtol=1e-6)
    stopped = cfg(6)
    stopped.budget_minutes = 1e-9  # spent at the first logging step (2); its clock never reaches a step
    distill.run(stopped, str(tmp_path / "resumed"))
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints"))[-1].endswith("2")
    c = cfg(6)
    distill.run(c, str(tmp_path / "resumed"))
    np.testing.assert_allclose(images_of(tmp_path / "resumed")[0], images_of(tmp_path / "full")[0], atol=1e-6)
    distill.run(tiny.get_config(f"data={tiny_data},steps=6"), str(tmp_path / "constant"))
    assert np.abs(images_of(tmp_path / "full")[0] - images_of(tmp_path / "constant")[0]).max() > 1e-4

    ctx = context.build(c, str(tmp_path / "ctx"))
    state = step_lib.init_state(distill.jax.random.PRNGKey(0), ctx.spec, method=ctx.method,
                                feat_dim=ctx.backbone.embed_dim, init_images=None)
    step = loop.jitted_step(ctx.spec, ctx.method, ctx.mesh, ctx.embed, donate=False)
    real = loop.cache_arrays(distill.train_cache(ctx), ctx.spec.num_classes)
    frozen, _ = step(dict(state, lr_scale=distill.jax.numpy.zeros(())), {}, ctx.backbone.params, real)
    moved, _ = step(state, {}, ctx.backbone.params, real)
    same = distill.jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                frozen["params"]["syn"], state["params"]["syn"])
    assert max(distill.jax.tree.leaves(same)) == 0.0
    diff = distill.jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                moved["params"]["syn"], state["params"]["syn"])
    assert max(distill.jax.tree.leaves(diff)) > 0.0
