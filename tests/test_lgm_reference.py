"""jdd's LGM step against a PyTorch reference of the official code's step, written here.

The reference follows GeorgeCazenavette/linear-gradient-matching (read, not copied):
`synsets/pyramid.py:PyramidDataset.decode_pyramid` (upsample + sum, colour decorrelation, sigmoid(2x)),
`augmentation/ops/*` (flip, grid_sample crop, noise mean 0.5), `distillation/linear_gm.py:LinearGM.
match_gradients` (a random head, CE gradients w.r.t. the head with create_graph, 1 - cosine of the
flattened [weight, bias] gradients, backward to the pyramid, Adam) and `extend_pyramid` (rescale, new
level randn / levels, a fresh Adam). The backbone is a tiny random `transformers` DINOv2 converted by
jdd's loader. The random draws are fixed on both sides: one given head (jdd's head draw is replaced),
and an augmentation chain whose draws cannot vary (flip p=1, the official crop at scale = ratio = 1,
noise p=1 with std 0 and mean 0.5); the crop's random boxes are compared on their own with shared
uniforms. Everything in float32; tolerances are relative to the reference's largest entry.
"""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jdd import augment, config as jc, context, methods, parallel, step as step_lib, synsets  # noqa: E402
from jdd.methods import linear  # noqa: E402
from _parity import perturbed, rel_diff  # noqa: E402

C, IPC, COPIES, RES, CROP, LR = 3, 1, 2, 16, 12, 2e-3
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
COLOR = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
# The augmentation chain with nothing left to chance (see the module doc).
FIXED_AUG = dict(flip_p=1.0, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), noise_p=1.0, noise_std=0.0, noise_mean=0.5)


# ------------------------------------------------------------------ the PyTorch reference

def ref_decode(pyramid, res):
    """Official decode_pyramid: pyramid NCHW levels (any order)."""
    z = sum(F.interpolate(p, (res, res), mode="bilinear", antialias=False, align_corners=False) for p in pyramid)
    z = torch.einsum("bchw,dc->bdhw", z, COLOR / torch.linalg.norm(COLOR, dim=0).max())
    return torch.sigmoid(2 * z)


def ref_crop(images, u, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Official RandomResizedCrop.forward with its uniforms u [B, 4] given."""
    s = u[:, 0] * (scale[1] - scale[0]) + scale[0]
    lr = (np.log(ratio[0]), np.log(ratio[1]))
    r = torch.exp(u[:, 1] * (lr[1] - lr[0]) + lr[0])
    sw, sh = torch.sqrt(s * r), torch.sqrt(s / r)
    theta = torch.zeros(images.shape[0], 2, 3, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = sw, sh
    theta[:, 0, 2] = (u[:, 2] * (1 - sw) + sw / 2 - 0.5) * 2
    theta[:, 1, 2] = (u[:, 3] * (1 - sh) + sh / 2 - 0.5) * 2
    grid = F.affine_grid(theta, (images.shape[0], images.shape[1], size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def ref_fixed_aug(x, size):
    """FIXED_AUG in the official op order: flip all, crop at scale = ratio = 1, add 0.5 to all."""
    x = torch.flip(x, dims=[3])
    x = ref_crop(x, torch.zeros(x.shape[0], 4), size, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    return x + 0.5


def ref_loss(pyramid, model, head_w, x_real, y_real, y_syn):
    """Official match_gradients' loss (without its AMP scale, which cancels in float32)."""
    def ce_grad(x, y, create):
        z = model(pixel_values=(x - MEAN) / STD).pooler_output
        w, b = head_w.clone().requires_grad_(True), torch.zeros(C, requires_grad=True)  # official: bias zeroed
        gw, gb = torch.autograd.grad(F.cross_entropy(z @ w.T + b, y), [w, b], create_graph=create)
        return torch.cat([gw.flatten(), gb.flatten()])
    g_real = ce_grad(ref_fixed_aug(x_real, CROP), y_real, False).detach()
    x_syn = ref_decode(pyramid, RES)
    g_syn = ce_grad(ref_fixed_aug(torch.cat([x_syn] * COPIES), CROP), torch.cat([y_syn] * COPIES), True)
    return 1 - F.cosine_similarity(g_real, g_syn, dim=0)


# ------------------------------------------------------------------ fixtures

def nchw(level):
    return torch.from_numpy(np.asarray(level).transpose(0, 3, 1, 2).copy())


def nhwc(t):
    return np.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
                                    image_size=RES, mlp_ratio=2)
    model = perturbed(transformers.Dinov2Model(cfg))
    model.requires_grad_(False)
    path = tmp_path_factory.mktemp("tiny_dinov2")
    model.save_pretrained(path)
    backbone = context.load_backbone(str(path))

    c = jc.base_config()
    jc.lgm_paper(c)
    c.syn.res, c.syn.ipc, c.data.crop_res, c.augment.copies, c.syn.extent = RES, IPC, CROP, COPIES, 5
    method = methods.get("lgm")
    spec = step_lib.make_spec(c, C, method)
    opts = dict(dict(spec.aug_opts), **{k: v for k, v in FIXED_AUG.items()})
    spec = dataclasses.replace(spec, aug_opts=tuple(sorted(opts.items())))

    rng = np.random.default_rng(0)
    levels = [(rng.standard_normal((C * IPC, r, r, 3)) / 5).astype(np.float32)
              for r in synsets.level_resolutions(RES)]
    real = {"image": rng.random((C * IPC * COPIES, RES, RES, 3), dtype=np.float32),
            "label": np.repeat(np.arange(C), IPC * COPIES).astype(np.int32)}
    head_w = (0.01 * rng.standard_normal((C, backbone.embed_dim))).astype(np.float32)  # torch layout [C, D]
    return dict(model=model, backbone=backbone, spec=spec, method=method, levels=levels, real=real, head_w=head_w)


@pytest.fixture
def fixed_head(setup, monkeypatch):
    """jdd's per-step head draw replaced by the shared head (w [D, C], b = 0)."""
    w = jnp.asarray(setup["head_w"].T)
    monkeypatch.setattr(linear, "init_probe", lambda key, d, c, std: {"w": w, "b": jnp.zeros((c,), jnp.float32)})


def jdd_state(setup, levels):
    s = setup
    # len(levels) levels are active from step 5 * (len - 1) + 1 (extent 5): the state of that step.
    first = 5 * (len(levels) - 1) + 1
    state = step_lib.state_at(jax.random.PRNGKey(0), s["spec"], first + 1, method=s["method"],
                              feat_dim=s["backbone"].embed_dim, init_images=None)
    assert [lv.shape for lv in state["params"]["syn"]["levels"]] == [lv.shape for lv in levels]
    params = dict(state["params"], syn={"levels": [jnp.asarray(lv) for lv in levels]})
    return dict(state, params=params, step=jnp.asarray(first, jnp.int32))


def encode(setup):
    embed = context.embedder(setup["backbone"], "embedding")
    return parallel.batch_map(step_lib.encoder(embed.func, setup["spec"]), parallel.make_mesh(1))


def torch_pyramid(levels):
    return [nchw(lv).requires_grad_(True) for lv in levels]


def torch_grads(setup, pyramid):
    s = setup
    y = torch.arange(C).repeat_interleave(IPC)
    loss = ref_loss(pyramid, s["model"], torch.from_numpy(s["head_w"]),
                    nchw(s["real"]["image"]), torch.from_numpy(s["real"]["label"]).long(), y)
    grads = torch.autograd.grad(loss, pyramid)
    return float(loss.detach()), grads


# ------------------------------------------------------------------ tests

def test_official_crop_equals_grid_sample_with_shared_draws():
    """`rrc_lgm`'s resampling, boxes overhanging the image included, and its image gradient."""
    rng = np.random.default_rng(1)
    x = rng.random((16, 20, 20, 3), dtype=np.float32)
    u = rng.random((16, 4), dtype=np.float32)
    u[0] = (1.0, 1.0, 0.0, 1.0)  # the widest box: sw = sqrt(4/3) > 1, zero fill on both sides
    probe = rng.standard_normal((16, 12, 12, 3)).astype(np.float32)

    def ours(img):
        crop = jax.vmap(lambda i, uu: augment.grid_resized_crop(i, *augment.lgm_crop_params(uu), (12, 12)))
        return crop(img, jnp.asarray(u))
    xt = nchw(x).requires_grad_(True)
    ref = ref_crop(xt, torch.from_numpy(u), 12)
    (ref * nchw(probe)).sum().backward()
    out, vjp = jax.vjp(ours, jnp.asarray(x))
    assert rel_diff(out, nhwc(ref)) <= 1e-5
    assert rel_diff(vjp(jnp.asarray(probe))[0], nhwc(xt.grad)) <= 1e-5


def test_official_noise_adds_mean_half():
    """noise_mean=0.5 shifts a noised image by 0.5 (official RandomGaussianNoise(mean=0.5, std=0.2))."""
    x = jnp.zeros((4, 4, 3))
    y = augment.gaussian_noise(jax.random.PRNGKey(0), x, noise_std=0.0, noise_mean=0.5, noise_p=1.0)
    np.testing.assert_allclose(y, 0.5)


def test_step_loss_and_pyramid_gradients_match_reference(setup, fixed_head):
    s = setup
    state = jdd_state(s, s["levels"])
    f = jax.jit(step_lib.make_loss_and_grad(s["spec"], s["method"], encode(s)))
    (loss, _), (g, _) = f(state["params"], state["adv"], {}, s["backbone"].params,
                          jax.tree.map(jnp.asarray, s["real"]), jax.random.PRNGKey(3))
    ref_loss_value, ref_g = torch_grads(s, torch_pyramid(s["levels"]))
    assert abs(float(loss) - ref_loss_value) <= 1e-4 * abs(ref_loss_value)
    assert 0.0 < ref_loss_value < 2.0
    for ours, ref in zip(g["syn"]["levels"], ref_g):
        assert rel_diff(ours, nhwc(ref)) <= 1e-4


@pytest.mark.slow  # two step compiles (before and after the growth): ~30 s on a loaded 2-core CPU
def test_adam_steps_and_growth_match_reference(setup, fixed_head):
    """Levels after 1 and 5 Adam steps, then a growth (old levels rescaled, a fresh Adam), then 1 step."""
    s = setup
    spec = s["spec"]
    levels = s["levels"][:-1]  # the full-size level arrives at the growth below
    state = jdd_state(s, levels)
    step = jax.jit(step_lib.make_step(spec, s["method"], encode(s)))
    real = jax.tree.map(jnp.asarray, s["real"])
    pyramid = torch_pyramid(levels)
    opt = torch.optim.Adam([{"params": p, "lr": LR} for p in pyramid])

    def torch_step():
        opt.zero_grad()
        _, grads = torch_grads(s, pyramid)
        for p, gr in zip(pyramid, grads):
            p.grad = gr
        opt.step()

    def compare(tag):
        for ours, ref, start in zip(state["params"]["syn"]["levels"], pyramid, start_levels):
            # the update, relative to its own size (the levels themselves barely move)
            assert rel_diff(np.asarray(ours) - start, nhwc(ref) - start) <= 1e-3, tag

    start_levels = [np.asarray(lv) for lv in levels]
    for n in range(5):
        state, _ = step(state, {}, s["backbone"].params, real)
        torch_step()
        if n in (0, 4):
            compare(f"after {n + 1} Adam steps")

    # Growth at the step it is due: official extend_pyramid rescales by old_len / new_len.
    t = int(state["step"])
    assert synsets.num_levels(t, res=RES, extent=spec.extent) == len(levels) + 1
    before = [np.asarray(lv) for lv in state["params"]["syn"]["levels"]]
    grown = step_lib.grow(state, spec, t)
    new_levels = grown["params"]["syn"]["levels"]
    assert len(new_levels) == len(levels) + 1
    k = len(levels)
    with torch.no_grad():
        pyramid = [p.detach().clone() * k / (k + 1) for p in pyramid]
    for ours, ref in zip(new_levels[:-1], pyramid):
        assert rel_diff(ours, nhwc(ref)) <= 1e-5  # the levels after 5 steps already differ by ~1e-6
    for ours, old in zip(new_levels[:-1], before):
        np.testing.assert_allclose(ours, old * k / (k + 1), rtol=1e-6)
    assert new_levels[-1].shape == (C * IPC, RES, RES, 3)
    assert abs(float(jnp.std(new_levels[-1])) - 1 / (k + 1)) < 0.25 / (k + 1)  # randn / new_len
    # Adam re-created: every moment of the image parameters is zero again, its count restarted.
    for leaf in jax.tree.leaves(grown["opt"]["params"]):
        assert not np.any(np.asarray(leaf))
    # One step on the grown pyramid, with the new level shared: a fresh torch Adam, as the official code.
    pyramid.append(nchw(new_levels[-1]))
    pyramid = [p.requires_grad_(True) for p in pyramid]
    opt = torch.optim.Adam([{"params": p, "lr": LR} for p in pyramid])
    start_levels = [np.asarray(lv) for lv in new_levels]
    state, _ = step(grown, {}, s["backbone"].params, real)
    torch_step()
    compare("first step after growth")


def test_paper_config_is_the_official_defaults():
    from jdd import validation
    import pathlib
    c = jc.from_file(str(pathlib.Path(__file__).parents[1] / "configs" / "imagenette_dinov2s_lgm_paper.py"))
    validation.validate_config(c, check_paths=False)
    assert (c.steps, c.syn.res, c.data.real_res, c.data.crop_res, c.real.crop_res) == (5000, 256, 256, 224, 256)
    assert (c.syn.init, c.syn.extent, c.syn.grow_mode, c.syn.reset_opt_on_grow) == ("noise", 200, "lgm", True)
    assert c.syn.lr == 2e-3 and c.augment.ops == "flip,rrc_lgm,noise" and c.augment.copies == 10
    assert (c.augment.noise_mean, c.augment.noise_std) == (0.5, 0.2)
    assert (c.real.source, c.real.per_class, c.method.num_heads, c.method.head_std) == ("backbone", 0, 1, 0.01)
    assert c.real.sampling == "shuffled"  # their DataLoader(shuffle=True): class counts vary per step
    c = c.unlock()
    c.real.crop_res = 300  # beyond data.real_res: nothing to crop it from
    with pytest.raises(validation.ConfigError, match="real.crop_res"):
        validation.validate_config(c, check_paths=False)
    c.real.crop_res, c.real.source = 256, "cache"
    with pytest.raises(validation.ConfigError, match="real.sampling='shuffled'"):
        validation.validate_config(c, check_paths=False)


@pytest.mark.slow  # a whole (tiny) run through the engine: real batches from disk, compile, export
def test_paper_mode_runs_end_to_end(tmp_path):
    """The paper mode's own keys through the engine: shuffled real batches cropped at real_res (36 px)
    before the official crop to 32 px, noise of mean 0.5, pyramid growth with Adam reset."""
    import json
    import os

    from conftest import load_tiny_config, make_imagefolder
    from jdd import distill
    data = make_imagefolder(tmp_path / "data", counts={"train": 6, "val": 3}, seed=0)
    c = load_tiny_config().get_config(f"data={data},method=lgm,source=backbone,steps=4").unlock()
    c.augment.update(ops="flip,rrc_lgm,noise", noise_mean=0.5)
    c.real.crop_res, c.real.sampling = c.data.real_res, "shuffled"
    distill.run(c.lock(), str(tmp_path / "run"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
    with np.load(os.path.join(tmp_path / "run", "distilled.npz")) as f:
        assert f["images"].shape == (4, 32, 32, 3)
