"""The view-bank protocol (probe mode "bank"): K augmented views of each image encoded once, each epoch
of the LGM probe draws one of them per image; everything else is the full protocol."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from jdd import config as jc
from jdd import evaluators, probe, validation

from _probe_standins import C, D, N, RES, flip_shift
from _probe_standins import embed_jax as embed


def cfg_of(**kw):
    cfg = probe.probe_config()
    cfg.epochs, cfg.seeds, cfg.batch_max, cfg.lr_base, cfg.bank_views = 6, 3, 3, 0.5, 4
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(N, RES, RES, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    test_images = rng.uniform(size=(30, RES, RES, 3)).astype(np.float32)
    return images, labels, np.asarray(embed(jnp.asarray(test_images))), rng.integers(0, C, 30)


def test_bank_shapes_and_views(data):
    """view_bank: [K, N, D], view k of image i augmented with split(key, K * N)[k * N + i];
    bank_draw: one of image idx's K views per key, every view drawn over many keys."""
    images = jnp.asarray(data[0])
    key = jax.random.PRNGKey(4)
    bank = probe.view_bank(key, Partial(flip_shift), Partial(embed), images, 4, batch=5)
    assert bank.shape == (4, N, D)
    keys = jax.random.split(key, 4 * N)
    np.testing.assert_allclose(bank[2, 5], embed(flip_shift(keys[2 * N + 5], images[5])[None])[0], rtol=1e-5,
                               atol=1e-6)
    draw_keys = jax.random.split(jax.random.PRNGKey(0), 200)
    idx = jnp.arange(200) % N
    drawn = np.asarray(probe.bank_draw(bank, draw_keys, idx))
    assert drawn.shape == (200, D)
    which = [int(np.flatnonzero(np.all(np.isclose(np.asarray(bank[:, i]), row), axis=1))[0])
             for row, i in zip(drawn, np.asarray(idx))]
    assert sorted(set(which)) == [0, 1, 2, 3]


def test_bank_with_identical_views_is_features_mode(data):
    """Augmentation off: the K views of an image are its plain feature, and the bank probe is the
    features-only probe (same inits, batches and learning rates)."""
    images, labels, test_feats, test_labels = data
    key = jax.random.PRNGKey(3)
    plain = cfg_of(flip=False, rrc=False, mode="features")
    bank_cfg = cfg_of(flip=False, rrc=False, mode="bank")
    want = probe.evaluate(key, images, labels, embed, test_feats, test_labels, num_classes=C, cfg=plain)
    got = probe.evaluate(key, images, labels, embed, test_feats, test_labels, num_classes=C, cfg=bank_cfg)
    assert got["top1_per_seed"] == want["top1_per_seed"]
    feats = probe.embed_images(Partial(embed), jnp.asarray(images))
    bank = jnp.stack([feats] * 4)
    a = probe.train_linear(key, Partial(probe.bank_draw, bank), labels, num_classes=C, cfg=bank_cfg)
    b = probe.train_linear(key, feats, labels, num_classes=C, cfg=plain)
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a["b"], b["b"], rtol=1e-5, atol=1e-7)


def test_bank_probe_is_deterministic_per_seed_and_labelled(data):
    images, labels, test_feats, test_labels = data
    key = jax.random.PRNGKey(7)
    run = lambda **kw: probe.evaluate(key, images, labels, embed, test_feats, test_labels,  # noqa: E731
                                      num_classes=C, cfg=cfg_of(mode="bank", **kw), augment_fn=flip_shift)
    a, b = run(), run()
    assert a["top1_per_seed"] == b["top1_per_seed"]
    assert run(seeds=2)["top1_per_seed"] == a["top1_per_seed"][:2]  # seed s does not depend on the others
    assert a["protocol"]["mode"] == "bank" and a["protocol"]["bank_views"] == 4
    assert a["protocol"]["name"].startswith("view bank K=4")
    bank = probe.train_linear(key, Partial(probe.bank_draw, probe.view_bank(
        jax.random.fold_in(key, probe.BANK_TAG), Partial(flip_shift), Partial(embed), jnp.asarray(images), 4,
        batch=256)), labels, num_classes=C, cfg=cfg_of(mode="bank"))
    plain = probe.train_linear(key, probe.embed_images(Partial(embed), jnp.asarray(images)), labels,
                               num_classes=C, cfg=cfg_of(mode="features"))
    assert np.abs(np.asarray(bank["w"]) - np.asarray(plain["w"])).max() > 1e-4  # augmented views differ


def test_bank_keys_in_the_run_config():
    c = jc.base_config()
    c.eval.mode, c.eval.bank_views = "bank", 8
    assert evaluators.probe_config(c.eval, 112).bank_views == 8
    rules = {r.key: r for r in validation.RULES}
    assert rules["eval.mode"].allowed.test("bank")
    assert rules["eval.bank_views"].allowed.test(8) and not rules["eval.bank_views"].allowed.test(0)


@pytest.mark.slow  # a whole tiny run
def test_a_run_evaluated_with_the_bank_says_so_in_its_results(tmp_path):
    """eval.mode=bank through a run: results.json and results.md name the protocol "view bank K=2"."""
    import json

    from conftest import load_tiny_config, make_imagefolder
    from jdd import distill
    data = make_imagefolder(tmp_path / "data", counts={"train": 6, "val": 3}, seed=0)
    c = load_tiny_config().get_config(f"data={data},steps=0,evaluate=true")
    c.eval.mode, c.eval.bank_views, c.eval.epochs = "bank", 2, 4
    distill.run(c, str(tmp_path / "run"))
    (result,) = json.load(open(tmp_path / "run" / "results.json"))["results"].values()
    assert result["protocol"]["mode"] == "bank" and result["protocol"]["bank_views"] == 2
    assert result["protocol"]["name"].startswith("view bank K=2") and len(result["top1_per_seed"]) == 2
    assert "view bank K=2" in (tmp_path / "run" / "results.md").read_text()
