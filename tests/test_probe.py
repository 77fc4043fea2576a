"""jdd.probe: the LGM linear-probe protocol, against a per-step PyTorch float64 reference of LGM's loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jdd import augment, backbones, probe
from jdd.methods import linear

from _probe_standins import C, D, N, RES, embed_jax, embed_np, flip_shift


def small_cfg(**kw):
    cfg = probe.probe_config()
    cfg.epochs, cfg.seeds, cfg.batch_max, cfg.lr_base = 4, 2, 3, 0.5
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(N, RES, RES, 3)).astype(np.float32)
    hard = np.array([0, 1, 2, 0, 1, 2, 0])
    soft = rng.dirichlet(np.ones(C), size=N).astype(np.float32)
    return images, hard, soft


def reference(key, seed_id, labels, cfg, *, images=None, feats=None):
    """LGM's eval loop, one step at a time, in PyTorch float64: Linear head, Adam, CosineAnnealingLR
    stepped per epoch, shuffled batches with a partial last one, cross-entropy (probability targets).
    Uses the probe's key derivation so that batches and augmented views are the same."""
    y = np.eye(C)[labels] if np.ndim(labels) == 1 else np.asarray(labels, np.float64)
    init_key, run_key = probe.seed_keys(key, seed_id)
    p0 = linear.init_probe(init_key, D, C, cfg.init_std)
    fc = torch.nn.Linear(D, C).double()
    with torch.no_grad():
        fc.weight.copy_(torch.tensor(np.asarray(p0["w"], np.float64).T))
        fc.bias.copy_(torch.tensor(np.asarray(p0["b"], np.float64)))
    batch = min(cfg.batch_max, len(y))
    opt = torch.optim.Adam(fc.parameters(), lr=cfg.lr_base * batch / 256.0, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs, eta_min=0)
    aug = jax.jit(flip_shift)
    for e in range(cfg.epochs):
        perm_key, aug_key = probe.epoch_keys(run_key, e)
        perm = np.asarray(jax.random.permutation(perm_key, len(y)))
        vkeys = probe.view_keys(aug_key, len(y))
        for s in range(0, len(y), batch):
            idx = perm[s:s + batch]
            if feats is None:
                views = np.stack([np.asarray(aug(vkeys[i], images[i]), np.float64) for i in idx])
                x = embed_np(views)
            else:
                x = np.asarray(feats, np.float64)[idx]
            loss = torch.nn.functional.cross_entropy(fc(torch.tensor(x)), torch.tensor(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return fc.weight.detach().numpy().T, fc.bias.detach().numpy()


@pytest.fixture(scope="module")
def full_reference(data):
    images, hard, soft = data
    key, cfg = jax.random.PRNGKey(3), small_cfg()
    return {kind: [reference(key, s, lab, cfg, images=images) for s in range(cfg.seeds)]
            for kind, lab in (("hard", hard), ("soft", soft))}


def view_source(images):
    """What evaluate() trains on: features of augmented views (stand-in augmentation and backbone)."""
    return jax.tree_util.Partial(probe.augment_embed, jax.tree_util.Partial(flip_shift),
                                 jax.tree_util.Partial(embed_jax), jnp.asarray(images))


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_matches_per_step_reference(data, full_reference, chunk):
    images, hard, soft = data
    cfg = small_cfg(chunk_epochs=chunk)
    for kind, labels in (("hard", hard), ("soft", soft)):
        params = probe.train_linear(jax.random.PRNGKey(3), view_source(images), labels, num_classes=C, cfg=cfg)
        for s, (w, b) in enumerate(full_reference[kind]):
            np.testing.assert_allclose(params["w"][s], w, rtol=2e-4, atol=2e-5)
            np.testing.assert_allclose(params["b"][s], b, rtol=2e-4, atol=2e-5)
        assert np.abs(params["w"][0] - params["w"][1]).max() > 1e-3  # seeds differ


def test_chunk_length_from_memory_budget():
    cfg = small_cfg(epochs=1000, seeds=5)
    per_epoch = 5 * 10000 * 768 * 4  # ImageNet-1K x 10 ipc, ViT-B features, 5 seeds
    cfg.chunk_budget_mb = 13 * per_epoch // 2**20
    assert probe.make_hyper(cfg, 10000, 768, 5, full=True).chunk_epochs == 10  # largest divisor <= 13
    cfg.chunk_budget_mb = 0
    assert probe.make_hyper(cfg, 10000, 768, 5, full=True).chunk_epochs == 1
    cfg.chunk_epochs = 3
    with pytest.raises(ValueError, match="must divide epochs"):
        probe.make_hyper(cfg, 10000, 768, 5, full=True)


def test_features_mode_matches_reference_and_vmapped_seeds_equal_sequential(data):
    _, hard, soft = data
    feats = np.random.default_rng(2).normal(size=(N, D)).astype(np.float32)
    cfg, key = small_cfg(seeds=5), jax.random.PRNGKey(5)
    together = probe.train_linear(key, feats, soft, num_classes=C, cfg=cfg)
    for s in range(cfg.seeds):
        alone = probe.train_linear(key, feats, soft, num_classes=C, cfg=cfg, seed_ids=[s])
        np.testing.assert_allclose(together["w"][s], alone["w"][0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(together["b"][s], alone["b"][0], rtol=1e-6, atol=1e-7)
        w, b = reference(key, s, soft, cfg, feats=feats)
        np.testing.assert_allclose(together["w"][s], w, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(together["b"][s], b, rtol=2e-4, atol=2e-5)


def test_full_mode_unchunked_matches_reference_and_vmapped_seeds_equal_sequential(data, full_reference):
    images, hard, _ = data
    cfg, key = small_cfg(chunk_epochs=4), jax.random.PRNGKey(3)  # one chunk of all 4 epochs
    together = probe.train_linear(key, view_source(images), hard, num_classes=C, cfg=cfg)
    for s, (w, _) in enumerate(full_reference["hard"]):
        np.testing.assert_allclose(together["w"][s], w, rtol=2e-4, atol=2e-5)
        alone = probe.train_linear(key, view_source(images), hard, num_classes=C, cfg=cfg, seed_ids=[s])
        np.testing.assert_allclose(together["w"][s], alone["w"][0], rtol=1e-5, atol=1e-6)


def test_soft_one_hot_labels_equal_hard_labels(data):
    _, hard, _ = data
    feats = np.random.default_rng(3).normal(size=(N, D)).astype(np.float32)
    cfg, key = small_cfg(seeds=5), jax.random.PRNGKey(0)  # the shapes of the test above: no new compile
    a = probe.train_linear(key, feats, hard, num_classes=C, cfg=cfg)
    b = probe.train_linear(key, feats, np.eye(C, dtype=np.float32)[hard], num_classes=C, cfg=cfg)
    np.testing.assert_array_equal(a["w"], b["w"])


def test_reaches_100_percent_on_separable_features():
    """Default protocol (1000 epochs, 5 seeds, lr 1e-3 * N / 256) on well-separated classes."""
    rng = np.random.default_rng(0)
    k, dim = 4, 8
    means = 4.0 * np.eye(k, dim)
    ytr, yte = np.repeat(np.arange(k), 5), np.repeat(np.arange(k), 50)
    xtr = means[ytr] + 0.3 * rng.normal(size=(len(ytr), dim))
    xte = means[yte] + 0.3 * rng.normal(size=(len(yte), dim))
    res = probe.evaluate_features(jax.random.PRNGKey(0), xtr, ytr, xte, yte, num_classes=k,
                                  cfg=probe.probe_config())
    assert res["top1_per_seed"] == [100.0] * 5 and res["top1_std"] == 0.0
    assert res["protocol"]["name"] == "features-only (fast)"
    assert res["protocol"]["epochs"] == 1000 and res["protocol"]["batch"] == 20


def test_accuracy_matches_numpy():
    rng = np.random.default_rng(4)
    params = {"w": rng.normal(size=(3, D, C)).astype(np.float32), "b": rng.normal(size=(3, C)).astype(np.float32)}
    feats, labels = rng.normal(size=(23, D)).astype(np.float32), rng.integers(0, C, 23)
    want = [(np.argmax(feats @ params["w"][s] + params["b"][s], 1) == labels).mean() for s in range(3)]
    got = probe.accuracy(params, jnp.asarray(feats), jnp.asarray(labels), batch=5)  # 23 = 4 * 5 + 3
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.slow
def _tiny_vit_task(n: int, res: int, seed: int):
    """A tiny random DINOv2 (patch 8, 32 px), its embedder, n images of res px, 2 classes, test features."""
    bb = backbones.create("dinov2", "test", image_size=32)
    embed = probe.embedder(bb.apply, bb.params)
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(n, res, res, 3)).astype(np.float32)
    test_feats = probe.embed_images(embed, jnp.asarray(rng.uniform(size=(n, 32, 32, 3)), jnp.float32))
    return bb, embed, images, np.arange(n) % 2, test_feats


def test_tiny_vit_evaluation_is_reproducible():
    bb, embed, images, labels, test_feats = _tiny_vit_task(8, 32, 5)
    cfg = small_cfg(epochs=2, chunk_epochs=1)
    compiled = probe.train_program._cache_size()
    runs = [probe.evaluate(jax.random.PRNGKey(7), images, labels, probe.embedder(bb.apply, bb.params),
                           test_feats, labels, num_classes=2, cfg=cfg, meta={"backbone": bb.name})
            for _ in range(2)]
    assert runs[0]["top1_per_seed"] == runs[1]["top1_per_seed"]
    assert len(runs[0]["top1_per_seed"]) == 2 and runs[0]["backbone"] == "dinov2:test"
    assert runs[0]["protocol"]["augment"] == ["flip", "rrc"] and runs[0]["protocol"]["chunk_epochs"] == 1
    assert probe.train_program._cache_size() == compiled + 1  # a fresh, equal embedder reuses the compilation
    fast = probe.evaluate(jax.random.PRNGKey(7), images, labels, embed, test_feats, labels, num_classes=2,
                          cfg=small_cfg(epochs=2, mode="features"))
    assert fast["protocol"]["name"] == "features-only (fast)" and fast["protocol"]["augment"] == []


def test_full_protocol_reads_a_set_stored_at_a_size_the_backbone_cannot_read_through_its_crops():
    # LGM stores 256 px images for a patch-14 ViT that reads the protocol's 224 px crops: the shape
    # check must look at the views, not at the stored size (here 36 px images, patch 8, 32 px crops).
    _, embed, images, labels, test_feats = _tiny_vit_task(4, 36, 8)
    for mode in ("full", "bank"):
        res = probe.evaluate(jax.random.PRNGKey(0), images, labels, embed, test_feats, labels, num_classes=2,
                             cfg=small_cfg(epochs=1, mode=mode, out_res=32, bank_views=2))
        assert len(res["top1_per_seed"]) == 2
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):  # features mode reads 36 px
        probe.evaluate(jax.random.PRNGKey(0), images, labels, embed, test_feats, labels, num_classes=2,
                       cfg=small_cfg(epochs=1, mode="features"))


def test_default_augment_is_jdd_augment_flip_and_crop():
    cfg = small_cfg(out_res=8)
    img = jnp.asarray(np.random.default_rng(6).uniform(size=(RES, RES, 3)), jnp.float32)

    @jax.jit  # both in one compiled program: eager augmentation is slow
    def both(key):
        want = augment.augment(key, img[None], ops=("flip", "rrc"), out_res=8, rrc_scale=(0.08, 1.0),
                               rrc_ratio=(3 / 4, 4 / 3))[0]
        return probe.default_augment_fn(cfg)(key, img), want

    got, want = both(jax.random.PRNGKey(1))
    assert got.shape == (8, 8, 3)
    np.testing.assert_array_equal(got, want)


def test_bad_input_is_a_clear_error(data):
    images, hard, _ = data
    tf, tl = np.zeros((5, D), np.float32), np.zeros(5, int)
    cfg = small_cfg()
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        probe.evaluate(jax.random.PRNGKey(0), images[..., :1], hard, embed_jax, tf, tl, num_classes=C, cfg=cfg)
    with pytest.raises(ValueError, match="embedding size"):
        probe.evaluate(jax.random.PRNGKey(0), images, hard, embed_jax, tf[:, :2], tl, num_classes=C, cfg=cfg)
    with pytest.raises(ValueError, match="probabilities"):
        probe.evaluate_features(jax.random.PRNGKey(0), tf[:N], np.ones((5, C)), tf, tl, num_classes=C, cfg=cfg)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        probe.evaluate_features(jax.random.PRNGKey(0), tf, np.full(5, 3), tf, tl, num_classes=C, cfg=cfg)
    with pytest.raises(ValueError, match="unknown"):
        probe.evaluate(jax.random.PRNGKey(0), images, hard, embed_jax, tf, tl, num_classes=C,
                       cfg=small_cfg(mode="fast"))
