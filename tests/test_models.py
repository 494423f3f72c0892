"""Tests of synreal_ray.models: tiny UNIT and CycleGAN (32x64 images, 8 channels) on CPU."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from synreal_ray.models import UNIT, CycleGAN, build_model, check_checkpoint_version, default_config
from synreal_ray.models.blocks import ImagePool, LayerNorm, UpBlock
from synreal_ray.models.losses import kl_per_sample, l1_per_sample, lsgan_loss, weighted_mean

H, W = 32, 64
TINY = {
    "cyclegan": dict(base_channels=8, n_res=2, dis_channels=8, pool_size=4, pool_seed=0),
    "unit": dict(base_channels=8, n_res=2, n_shared=1, dis_channels=8, dis_layers=2, dis_scales=2),
}
MODELS = list(TINY)


@pytest.fixture(autouse=True)
def one_thread():
    # The models are tiny: intra-op threads only add contention on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(name: str, seed: int = 0, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **{**TINY[name], **over})


def images(b: int, seed: int) -> torch.Tensor:
    """Smooth random images in [-1, 1] (low-resolution noise up-sampled): learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, H // 8, W // 8, generator=g) * 2 - 1
    return F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)


def grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


# -- losses ---------------------------------------------------------------------------------


def test_per_sample_losses_with_unit_weights_equal_the_plain_torch_losses():
    torch.manual_seed(0)
    a, b = torch.randn(4, 3, 8, 16), torch.randn(4, 3, 8, 16)
    ones = torch.ones(4)
    scales = [torch.randn(4, 1, 6, 10), torch.randn(4, 1, 3, 5)]
    assert torch.allclose(weighted_mean(l1_per_sample(a, b), ones), F.l1_loss(a, b))
    assert torch.allclose(weighted_mean(kl_per_sample(a), ones), (a**2).mean())
    assert torch.allclose(weighted_mean(lsgan_loss(a, True), ones), F.mse_loss(a, torch.ones_like(a)))
    assert torch.allclose(weighted_mean(lsgan_loss(a, False), ones), F.mse_loss(a, torch.zeros_like(a)))
    multi = sum(F.mse_loss(s, torch.ones_like(s)) for s in scales)  # summed over scales, as official UNIT
    assert torch.allclose(weighted_mean(lsgan_loss(scales, True), ones), multi)
    assert lsgan_loss(scales, True).shape == (4,)
    assert torch.equal(weighted_mean(l1_per_sample(a, b), None), l1_per_sample(a, b).mean())


def test_weighted_mean_divides_by_batch_size_not_by_weight_sum():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.tensor([2.0, 0.0, 1.0, 0.0])
    assert weighted_mean(per_sample, w).item() == pytest.approx((2 * 1 + 3) / 4)
    assert weighted_mean(per_sample, torch.zeros(4)).item() == 0.0  # not 0/0
    with pytest.raises(ValueError):
        weighted_mean(per_sample, torch.ones(3))


# -- shapes and interface -------------------------------------------------------------------


def test_unit_decoder_upsampling_blocks_hold_a_layernorm_over_c_h_w_per_sample():
    """Official UNIT Decoder: Upsample + Conv2dBlock(norm='ln'); its LayerNorm normalises each
    sample over all of (C, H, W) with the unbiased std, (x - mean) / (std + eps), then a
    per-channel gamma, beta. The residual blocks keep InstanceNorm."""
    model = tiny("unit")
    for side in ("dec_syn", "dec_real"):
        ups = [m for m in model.generators[side] if isinstance(m, UpBlock)]
        assert len(ups) == 2  # n_downsample
        assert all(isinstance(u[1][1], LayerNorm) for u in ups)
    assert not any(isinstance(m, LayerNorm) for k in ("enc_syn", "enc_shared", "dec_shared")
                   for m in model.generators[k].modules())
    ln = LayerNorm(3)
    with torch.no_grad():
        ln.gamma.copy_(torch.tensor([1.0, 2.0, 0.5]))
        ln.beta.copy_(torch.tensor([0.0, 1.0, -1.0]))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5) * torch.tensor([1.0, 10.0]).view(2, 1, 1, 1) + 3  # samples on other scales
    y = ln(x)
    by_hand = torch.stack([(s - s.mean()) / (s.flatten().std(unbiased=True) + 1e-5) for s in x])
    assert torch.allclose(y, by_hand * ln.gamma.view(1, 3, 1, 1) + ln.beta.view(1, 3, 1, 1), atol=1e-6)
    unit = (y - ln.beta.view(1, 3, 1, 1)) / ln.gamma.view(1, 3, 1, 1)
    assert torch.allclose(unit.flatten(1).mean(1), torch.zeros(2), atol=1e-5)  # per sample, not per channel
    assert torch.allclose(unit.flatten(1).std(1), torch.ones(2), atol=1e-4)
    assert not torch.allclose(unit.mean((2, 3)), torch.zeros(2, 3), atol=1e-2)
    assert torch.allclose(ln(x[1:]), y[1:], atol=1e-6)  # no sample changes another's output


def test_checkpoints_of_another_version_fail_with_one_line():
    """UNIT checkpoints written before the decoder's LayerNorm (no checkpoint_version: version 1)
    cannot load into the new decoder; CycleGAN's layout did not change."""
    check_checkpoint_version("unit", UNIT.checkpoint_version, "ckpt")
    check_checkpoint_version("cyclegan", None, "ckpt")
    with pytest.raises(ValueError) as e:
        check_checkpoint_version("unit", None, "out/train/checkpoint_00000500")
    assert str(e.value).startswith("out/train/checkpoint_00000500: a unit checkpoint of version 1, this code loads version 2")
    assert "LayerNorm" in str(e.value) and "\n" not in str(e.value)
    old = {k: v for k, v in tiny("unit").state_dict().items() if ".gamma" not in k and ".beta" not in k}
    with pytest.raises(RuntimeError, match="Missing key"):  # what the version check spares the user
        tiny("unit").load_state_dict(old)


@pytest.mark.parametrize("name", MODELS)
def test_forward_shapes_and_translate_range(name):
    model = tiny(name)
    x = images(2, 1) * 3  # out-of-range input must still give outputs in [-1, 1]
    y = model.translate(x)
    assert y.shape == x.shape and not y.requires_grad
    assert y.min() >= -1 and y.max() <= 1
    assert model.training  # translate restores the mode
    assert model(x).shape == x.shape
    for d in model.discriminators.values():
        out = d(x)
        outs = out if isinstance(out, list) else [out]
        assert all(o.shape[:2] == (2, 1) and o.shape[2] >= 1 and o.shape[3] >= 1 for o in outs)
    if name == "unit":
        assert model.encode(x, "syn").shape == (2, 8 * 4, H // 4, W // 4)
        assert len(model.discriminators["real"](x)) == 2


def test_unit_shares_the_encoders_last_and_decoders_first_layers():
    model = tiny("unit")
    g = model.generators
    shared = {id(p) for k in ("enc_shared", "dec_shared") for p in g[k].parameters()}
    private = {id(p) for k in ("enc_syn", "enc_real", "dec_syn", "dec_real") for p in g[k].parameters()}
    assert shared and not shared & private
    s2r = model.generator_s2r()
    assert s2r.enc_shared is g["enc_shared"] and s2r.dec_real is g["dec_real"]


def test_build_model_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("pix2pix")
    with pytest.raises(ValueError, match="n_blocks"):
        build_model("cyclegan", n_blocks=3)
    assert isinstance(build_model("CycleGAN", **TINY["cyclegan"]), CycleGAN)
    assert default_config("unit")["recon_x_w"] == 10.0 and default_config("cyclegan")["cyc_w"] == 10.0


@pytest.mark.parametrize("name", MODELS)
def test_generator_s2r_saves_alone(name):
    model = tiny(name, seed=0)
    buf = io.BytesIO()
    torch.save(model.generator_s2r().state_dict(), buf)
    other = tiny(name, seed=1)
    x = images(2, 2)
    assert not torch.equal(other.translate(x), model.translate(x))
    buf.seek(0)
    other.generator_s2r().load_state_dict(torch.load(buf))
    assert torch.equal(other.translate(x), model.translate(x))


# -- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_losses_finite_and_decrease_on_a_fixed_batch(name):
    model = tiny(name)
    opts = model.make_optimizers(lr=1e-3)
    xs, xr = images(2, 1), images(2, 2)
    ws, wr = torch.tensor([1.0, 0.5]), torch.tensor([0.8, 1.2])
    hist = [model.train_step(xs, xr, ws, wr, opts) for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in hist)
    expected = {"gen_total", "dis_total", "dis_syn", "dis_real", "gen_adv_s2r", "gen_adv_r2s", "cyc_syn", "cyc_real"}
    assert expected <= set(hist[0])
    watched = ["gen_total", "cyc_syn", "cyc_real"] + (["recon_syn", "recon_real"] if name == "unit" else [])
    for key in watched:
        last = sum(h[key] for h in hist[-5:]) / 5
        assert last < hist[0][key], (key, hist[0][key], last)


@pytest.mark.parametrize("name", MODELS)
def test_zero_weight_samples_leave_gradients_unchanged(name):
    """Sample 1 of the synthetic and sample 2 of the real batch have weight 0: replacing their
    images by entirely different ones changes no loss and no gradient. compute_losses bypasses
    the image pool; UNIT's latent noise is made equal by re-seeding; InstanceNorm keeps samples
    independent (BatchNorm's batch statistics would couple them)."""
    model = tiny(name)
    gen_p, dis_p = list(model.generators.parameters()), list(model.discriminators.parameters())
    xs, xr = images(3, 1), images(3, 2)
    ws, wr = torch.tensor([1.0, 0.0, 0.7]), torch.tensor([0.5, 1.3, 0.0])

    def run(xs, xr):
        torch.manual_seed(123)
        losses = model.compute_losses(xs, xr, ws, wr)
        return losses, grads(losses["gen_total"], gen_p), grads(losses["dis_total"], dis_p)

    base_l, base_g, base_d = run(xs, xr)
    xs2, xr2 = xs.clone(), xr.clone()
    xs2[1] = -images(1, 3)[0]
    xr2[2] = torch.rand(3, H, W) * 2 - 1
    losses, g, d = run(xs2, xr2)
    for k in base_l:
        assert torch.allclose(losses[k], base_l[k], rtol=1e-6, atol=1e-8), k
    for a, b in zip(g + d, base_g + base_d):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
    # control: the same change to a sample of non-zero weight does change the gradients
    xs3 = xs.clone()
    xs3[0] = xs2[1]
    _, g3, _ = run(xs3, xr)
    assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(g3, base_g))


def test_cyclegan_with_unit_weights_equals_the_unweighted_baseline():
    """The importance-weighted losses with all weights 1 are the textbook CycleGAN losses."""
    model = tiny("cyclegan")
    xs, xr = images(2, 1), images(2, 2)
    got = model.compute_losses(xs, xr, torch.ones(2), torch.ones(2))
    G, D = model.generators, model.discriminators
    fr, fs = G["s2r"](xs), G["r2s"](xr)
    mse = lambda p, t: F.mse_loss(p, torch.full_like(p, t))  # noqa: E731
    ref = {
        "gen_adv_s2r": mse(D["real"](fr), 1.0),
        "gen_adv_r2s": mse(D["syn"](fs), 1.0),
        "cyc_syn": F.l1_loss(G["r2s"](fr), xs),
        "cyc_real": F.l1_loss(G["s2r"](fs), xr),
        "idt_syn": F.l1_loss(G["r2s"](xs), xs),
        "idt_real": F.l1_loss(G["s2r"](xr), xr),
        "dis_syn": 0.5 * (mse(D["syn"](xs), 1.0) + mse(D["syn"](fs.detach()), 0.0)),
        "dis_real": 0.5 * (mse(D["real"](xr), 1.0) + mse(D["real"](fr.detach()), 0.0)),
    }
    ref["gen_total"] = (
        ref["gen_adv_s2r"] + ref["gen_adv_r2s"] + 10 * (ref["cyc_syn"] + ref["cyc_real"]) + 5 * (ref["idt_syn"] + ref["idt_real"])
    )
    for k, v in ref.items():
        assert torch.allclose(got[k], v, rtol=1e-5), k
    none = model.compute_losses(xs, xr, None, None)
    assert all(torch.allclose(none[k], got[k]) for k in got)


def test_unit_with_unit_weights_equals_the_unweighted_baseline(monkeypatch):
    """The official UNIT losses by hand (trainer.py, networks.py MsImageDis): the LSGAN terms SUMMED
    over the discriminator scales (`loss += mean((D_s(x) - t)^2)` per scale s), and the
    discriminators minimising gan_w * (loss_dis_syn + loss_dis_real); gan_w 2 so its place shows."""
    model = tiny("unit", gan_w=2.0)
    monkeypatch.setattr(model, "_noise_like", torch.zeros_like)  # deterministic latent codes
    xs, xr = images(2, 1), images(2, 2)
    got = model.compute_losses(xs, xr, torch.ones(2), torch.ones(2))
    G, D = model.generators, model.discriminators
    enc = lambda x, d: G["enc_shared"](G[f"enc_{d}"](x))  # noqa: E731
    dec = lambda z, d: G[f"dec_{d}"](G["dec_shared"](z))  # noqa: E731
    mse = lambda outs, t: sum(F.mse_loss(o, torch.full_like(o, t)) for o in outs)  # noqa: E731
    mu_s, mu_r = enc(xs, "syn"), enc(xr, "real")
    fr, fs = dec(mu_s, "real"), dec(mu_r, "syn")
    mu_sr, mu_rs = enc(fr, "real"), enc(fs, "syn")
    ref = {
        "gen_adv_s2r": mse(D["real"](fr), 1.0),
        "gen_adv_r2s": mse(D["syn"](fs), 1.0),
        "recon_syn": F.l1_loss(dec(mu_s, "syn"), xs),
        "recon_real": F.l1_loss(dec(mu_r, "real"), xr),
        "kl_syn": (mu_s**2).mean(),
        "kl_real": (mu_r**2).mean(),
        "cyc_syn": F.l1_loss(dec(mu_sr, "syn"), xs),
        "cyc_real": F.l1_loss(dec(mu_rs, "real"), xr),
        "kl_cyc_syn": (mu_sr**2).mean(),
        "kl_cyc_real": (mu_rs**2).mean(),
        "dis_syn": 2 * (mse(D["syn"](xs), 1.0) + mse(D["syn"](fs.detach()), 0.0)),
        "dis_real": 2 * (mse(D["real"](xr), 1.0) + mse(D["real"](fr.detach()), 0.0)),
    }
    assert len(D["real"](xr)) == 2  # two scales: a mean over them would halve the adversarial terms
    ref["dis_total"] = ref["dis_syn"] + ref["dis_real"]
    ref["gen_total"] = (
        2 * (ref["gen_adv_s2r"] + ref["gen_adv_r2s"])
        + 10 * (ref["recon_syn"] + ref["recon_real"] + ref["cyc_syn"] + ref["cyc_real"])
        + 0.01 * (ref["kl_syn"] + ref["kl_real"] + ref["kl_cyc_syn"] + ref["kl_cyc_real"])
    )
    for k, v in ref.items():
        assert torch.allclose(got[k], v, rtol=1e-5), k


def test_image_pool_keeps_each_image_with_its_weight():
    pool = ImagePool(size=3, seed=0)
    from_history = 0
    for step in range(20):
        w = torch.arange(2, dtype=torch.float32) + 10 * step  # unique weight per image
        imgs = w.view(2, 1, 1, 1).expand(2, 3, 4, 4).clone()  # image filled with its weight
        out_imgs, out_w = pool.query(imgs, w)
        assert out_imgs.shape == imgs.shape and out_w.shape == w.shape
        assert torch.equal(out_imgs[:, 0, 0, 0], out_w)  # every image still carries its own weight
        assert torch.equal(out_imgs.amin((1, 2, 3)), out_imgs.amax((1, 2, 3)))
        from_history += int((out_w < 10 * step).sum())
    assert len(pool) == 3 and from_history > 0
    off = ImagePool(size=0)
    assert torch.equal(off.query(imgs, w)[1], w) and len(off) == 0


def test_cyclegan_without_a_pool_seed_repeats_under_the_same_torch_seed():
    # The pools' choices follow torch's seed (the run's), so two runs of one config train alike;
    # a different seed draws different choices.
    def pooled_weights(seed: int) -> list[float]:
        model = tiny("cyclegan", seed=seed, pool_size=2, pool_seed=None)
        opts = model.make_optimizers()
        for step in range(6):
            torch.manual_seed(step)  # as the training loop does at every step
            model.train_step(images(2, step), images(2, 10 + step), torch.tensor([step, 0.5]),
                             torch.tensor([1.0, 2.0 + step]), opts)
        return [float(w) for w in model.pools["real"].weights] + [model.pools["real"].rng.random()]

    assert pooled_weights(0) == pooled_weights(0)
    assert pooled_weights(0)[-1] != pooled_weights(1)[-1]


def test_cyclegan_train_step_sends_pooled_fakes_with_their_weights():
    model = tiny("cyclegan", pool_size=2)
    opts = model.make_optimizers()
    for step in range(4):
        model.train_step(images(2, step), images(2, 10 + step), torch.tensor([step, 0.5]), torch.tensor([1.0, 2.0 + step]), opts)
    # fakes of the real domain come from synthetic samples: their weights are w_syn values
    assert {round(float(w), 3) for w in model.pools["real"].weights} <= {0.0, 1.0, 2.0, 3.0, 0.5}
    assert {round(float(w), 3) for w in model.pools["syn"].weights} <= {1.0, 2.0, 3.0, 4.0, 5.0}


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip_is_bit_identical(name):
    model = tiny(name, seed=0, **({"pool_size": 0} if name == "cyclegan" else {}))
    opts = model.make_optimizers()
    scheds = model.make_schedulers(opts, total_steps=4, step_size=1, gamma=0.5)
    xs, xr, w = images(2, 1), images(2, 2), torch.tensor([1.0, 0.3])
    for _ in range(2):
        model.train_step(xs, xr, w, w, opts)
        for s in scheds.values():
            s.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), **{f"opt_{k}": o.state_dict() for k, o in opts.items()},
                **{f"sched_{k}": s.state_dict() for k, s in scheds.items()}}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)

    other = tiny(name, seed=1, **({"pool_size": 0} if name == "cyclegan" else {}))
    other_opts = other.make_optimizers()
    other_scheds = other.make_schedulers(other_opts, total_steps=4, step_size=1, gamma=0.5)
    other.load_state_dict(ckpt["model"])
    for k in other_opts:
        other_opts[k].load_state_dict(ckpt[f"opt_{k}"])
        other_scheds[k].load_state_dict(ckpt[f"sched_{k}"])
    assert _state_equal(model.state_dict(), other.state_dict())
    for k in opts:
        assert _state_equal(opts[k].state_dict(), other_opts[k].state_dict())
        assert other_opts[k].param_groups[0]["lr"] == opts[k].param_groups[0]["lr"]
    # training goes on identically from the restored copy
    torch.manual_seed(7)
    a = model.train_step(xs, xr, w, w, opts)
    torch.manual_seed(7)
    b = other.train_step(xs, xr, w, w, other_opts)
    assert a == b and _state_equal(model.state_dict(), other.state_dict())


def test_schedulers_decay_linearly_in_the_second_half():
    model = tiny("cyclegan")
    opts = model.make_optimizers(lr=1.0)
    sched = model.make_schedulers(opts, total_steps=10)["gen"]
    lrs = []
    for _ in range(10):
        lrs.append(opts["gen"].param_groups[0]["lr"])
        opts["gen"].step()  # no gradients: a no-op, but the scheduler expects it first
        sched.step()
    assert lrs == pytest.approx([1, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2])
    assert opts["dis"].param_groups[0]["lr"] == 1.0
    assert UNIT.default_lr == 1e-4 and CycleGAN.default_lr == 2e-4


def test_unit_lr_halves_exactly_at_multiples_of_step_size():
    """Official UNIT `lr_policy: step` (utils.get_scheduler, StepLR stepped once per iteration):
    the lr of step i is lr * gamma ** (i // step_size), for the generators and the discriminators."""
    model = tiny("unit")
    opts = model.make_optimizers(lr=1e-4)
    scheds = model.make_schedulers(opts, total_steps=5, step_size=3, gamma=0.5)  # total_steps unused
    used = {"gen": [], "dis": []}
    for _ in range(10):
        for k in opts:
            used[k].append(opts[k].param_groups[0]["lr"])
            opts[k].step()  # no gradients: a no-op, but the scheduler expects it first
            scheds[k].step()
    want = [1e-4 * 0.5 ** (i // 3) for i in range(10)]  # 1e-4 x3, 5e-5 x3, 2.5e-5 x3, 1.25e-5
    assert used["gen"] == pytest.approx(want, rel=1e-12) and used["dis"] == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="needs step_size and gamma"):
        model.make_schedulers(opts, total_steps=5)


@pytest.mark.parametrize("name", MODELS)
def test_amp_is_ignored_on_cpu(name):
    xs, xr, w = images(2, 1), images(2, 2), torch.tensor([1.0, 0.5])
    runs = []
    for amp in (False, True):
        model = tiny(name, **({"pool_size": 0} if name == "cyclegan" else {}))
        opts = model.make_optimizers()
        torch.manual_seed(3)
        runs.append(model.train_step(xs, xr, w, w, opts, scaler=torch.amp.GradScaler("cpu"), amp=amp))
    assert runs[0] == runs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", MODELS)
def test_amp_train_step_on_cuda(name):
    model = tiny(name).cuda()
    opts = model.make_optimizers()
    scaler = torch.amp.GradScaler("cuda")
    xs, xr, w = images(2, 1).cuda(), images(2, 2).cuda(), torch.tensor([1.0, 0.5]).cuda()
    for _ in range(3):
        losses = model.train_step(xs, xr, w, w, opts, scaler=scaler, amp=True)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert model.translate(xs).dtype == torch.float32


# -- DDP ------------------------------------------------------------------------------------


def _sgd(model):
    # SGD, not Adam: Adam's first steps are ~lr * sign(grad), which rounding noise can flip
    return {k: torch.optim.SGD(getattr(model, f"{g}").parameters(), lr=0.05)
            for k, g in (("gen", "generators"), ("dis", "discriminators"))}


def _ddp_worker(rank: int, world: int, init_file: str, data: dict, states: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b = data["xs"].shape[0] // world
        part = {k: v[rank * b:(rank + 1) * b].double() for k, v in data.items()}
        result = {}
        for name, state in states.items():
            model = build_model(name, **{**TINY[name], **({"pool_size": 0} if name == "cyclegan" else {})})
            model.load_state_dict(state)
            model.double().wrap(DistributedDataParallel)
            opts = _sgd(model)
            torch.manual_seed(rank)
            for _ in range(2):  # twice: the reducer must be ready again for the next step
                model.train_step(part["xs"], part["xr"], part["ws"], part["wr"], opts)
            result[name] = model.state_dict()
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes (~10-30 s on a loaded 2-core machine)
def test_ddp_wrapped_training_matches_single_process_on_the_whole_batch(tmp_path):
    """Two gloo workers, each with half the batch, end with parameters identical to each other
    and (CycleGAN: no noise, no pool) equal to one process training on the whole batch: every
    submodule's gradients, the discriminators' included, are all-reduced, and sum(w*l)/B per
    worker averaged over workers is the whole batch's loss. In float64: in float32 the tiny
    random model amplifies rounding differences (batch of 2 vs 4) to ~1% by the second step."""
    import torch.multiprocessing as mp

    data = {"xs": images(4, 1), "xr": images(4, 2), "ws": torch.tensor([1.0, 0.0, 2.0, 0.5]),
            "wr": torch.tensor([0.3, 1.0, 1.0, 1.7])}
    models = {name: tiny(name, **({"pool_size": 0} if name == "cyclegan" else {})) for name in MODELS}
    states = {name: copy.deepcopy(m.state_dict()) for name, m in models.items()}
    out = str(tmp_path / "state")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), data, states, out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    for name in MODELS:
        assert _state_equal(r0[name], r1[name]), name
        assert not _state_equal(r0[name], states[name])
    ref = models["cyclegan"].double()
    opts = _sgd(ref)
    for _ in range(2):
        ref.train_step(data["xs"].double(), data["xr"].double(), data["ws"], data["wr"], opts)
    for k, v in ref.state_dict().items():
        assert torch.allclose(r0["cyclegan"][k], v, rtol=1e-9, atol=1e-12), k
