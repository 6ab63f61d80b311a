"""The convolutional ladder: site contract, every estimator, evaluate, sample, diagnostics."""

import pyro
import pytest
import torch
from pyro import poutine

from pyro_ladder import ESTIMATORS, ConfigError, DataError, evaluate, make_elbo
from pyro_ladder.conv import ConvLadderConfig, ConvLadderVAE, conv_preset
from pyro_ladder.conv.blocks import resolutions
from pyro_ladder.diagnostics import active_units

SMALL = dict(image_shape=(12, 12), channels=(6, 8), latent_channels=(2, 3))
WEIGHTED = (
    "iwae", "renyi", "iwae-dreg", "iwae-stl", "miwae", "ciwae", "piwae",
    "miwae-dreg", "piwae-dreg", "rws", "rws-dreg", "vimco",
)  # fmt: skip


def _vae(inference="top-down", skip=True, dtype=torch.float64, **kw):
    torch.manual_seed(3)
    return ConvLadderVAE(**{**SMALL, "inference": inference, "skip": skip, **kw}).to(dtype)


def _x(n=4, dtype=torch.float64):
    torch.manual_seed(5)
    return torch.rand(n, 144, dtype=dtype).round()


def _traces(vae, x):
    guide = poutine.trace(vae.guide).get_trace(x)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    return guide, model


def _sites(trace):
    return [n for n, s in trace.nodes.items() if s["type"] == "sample" and n != "data"]


def test_resolutions_halve_rounding_up():
    assert resolutions((28, 28), 3) == [(14, 14), (7, 7), (4, 4)]
    assert resolutions((12, 8), 2) == [(6, 4), (3, 2)]


@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
@pytest.mark.parametrize("skip", [True, False])
def test_site_shapes_and_order(inference, skip):
    vae, x = _vae(inference, skip), _x()
    guide, model = _traces(vae, x)
    assert _sites(model) == ["z2", "z1", "x"]
    order = ["z2", "z1"] if inference == "top-down" else ["z1", "z2"]
    assert _sites(guide) == order
    shapes = {"z2": (3, 3, 3), "z1": (2, 6, 6)}
    for trace in (guide, model):
        for name, event in shapes.items():
            site = trace.nodes[name]
            assert tuple(site["fn"].event_shape) == event and site["fn"].batch_shape == (4,)
            assert site["value"].shape == (4, *event)
            assert [f.name for f in site["cond_indep_stack"]] == ["data"]
    assert model.nodes["x"]["fn"].event_shape == (144,)
    assert model.nodes["x"]["value"] is x


def test_vectorized_particles_keep_the_contract():
    vae, x = _vae(), _x()
    with pyro.plate("particles", 5, dim=-2):
        guide, model = _traces(vae, x)
    assert guide.nodes["z1"]["value"].shape == (5, 4, 2, 6, 6)
    assert model.nodes["x"]["fn"].batch_shape == (5, 4)


def test_top_down_merge_uses_the_model_prior():
    """q(z1 | z2, x) is the precision-weighted product of p(z1 | z2) and the z1 head."""
    vae, x = _vae(), _x()
    guide, model = _traces(vae, x)
    p, q = model.nodes["z1"]["fn"].base_dist, guide.nodes["z1"]["fn"].base_dist
    loc_h, scale_h = vae.inference.upward(x)[0]
    precision = p.scale**-2 + scale_h**-2
    torch.testing.assert_close(q.scale, precision**-0.5)
    torch.testing.assert_close(q.loc, (p.loc * p.scale**-2 + loc_h * scale_h**-2) / precision)


def test_skip_path_reaches_the_likelihood():
    """With skip connections p(x | z) depends on z2 also through h, not only through z1."""
    vae, x = _vae(skip=True), _x()
    _, model = _traces(vae, x)
    z1 = model.nodes["z1"]["value"]
    z2 = model.nodes["z2"]["value"]

    def logits(z2_):
        return vae.generative.likelihood(z1, vae.generative.prior(1, z2_, None)[2])

    moved = logits(z2 + 1.0).base_dist.logits
    assert not torch.allclose(moved, logits(z2).base_dist.logits)
    vae_ns = _vae(skip=False)
    _, model = _traces(vae_ns, x)
    assert vae_ns.generative.prior(1, model.nodes["z2"]["value"], None)[2] is None


def _estimators():
    for name in sorted(ESTIMATORS):
        for inference in ("top-down", "bottom-up"):
            if inference == "bottom-up" and "meanfield" in name:
                continue  # analytic KL needs the model's site order (see test_elbo)
            yield name, inference


@pytest.mark.parametrize("name, inference", list(_estimators()))
def test_every_estimator_gives_finite_loss_and_gradient_to_every_network(name, inference):
    vae, x = _vae(inference), _x(3)
    options = {"alpha": 0.5} if name == "renyi" else {}
    elbo = make_elbo(name, 2 if name in WEIGHTED else 1, **options)
    with poutine.trace(param_only=True) as params:
        loss = elbo.loss_and_grads(vae.model, vae.guide, x)
    assert torch.isfinite(torch.as_tensor(loss))
    registered = {id(s["value"]) for s in params.trace.nodes.values()}
    for net in ("generative", "inference"):
        for pname, p in getattr(vae, net).named_parameters():
            assert id(p) in registered, (net, pname)
            assert p.grad is not None and torch.isfinite(p.grad).all(), (net, pname)
            assert p.grad.abs().sum() > 0, (name, net, pname)


def test_evaluate_runs_and_elbo_below_iwae():
    vae, x = _vae(), _x(6)
    pyro.set_rng_seed(1)
    out = evaluate(vae.model, vae.guide, x, num_samples=64, iwae_k=(1, 8))
    assert out["log_likelihood"].shape == (6,) and torch.isfinite(out["log_likelihood"]).all()
    assert out["elbo"].mean() < out["iwae"][8].mean() < out["log_likelihood"].mean() + 1e-9
    assert set(out["kl"]) == {"z1", "z2"} and all((kl > 0).all() for kl in out["kl"].values())


def test_training_improves_the_elbo():
    vae, x = _vae(dtype=torch.float32), _x(16, torch.float32)
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), make_elbo("elbo"))
    pyro.set_rng_seed(2)
    before = evaluate(vae.model, vae.guide, x, num_samples=8)["elbo"].mean()
    for _ in range(60):
        svi.step(x)
    pyro.set_rng_seed(2)
    after = evaluate(vae.model, vae.guide, x, num_samples=8)["elbo"].mean()
    assert after > before + 5.0, (before, after)


def test_sample_and_reconstruct_are_pixel_means():
    vae, x = _vae(), _x()
    for out, n in ((vae.sample(5), 5), (vae.reconstruct(x), 4)):
        assert out.shape == (n, 144) and ((out > 0) & (out < 1)).all()


def test_bernoulli_likelihood_scores_with_the_librarys_bernoulli():
    """The conv ladder's binary pixels go through likelihoods.Bernoulli: Pyro's density."""
    from pyro_ladder.likelihoods import Bernoulli

    vae, x = _vae(), _x()
    _, model = _traces(vae, x)
    fn = model.nodes["x"]["fn"]
    assert type(fn.base_dist) is Bernoulli and fn.event_shape == (144,)
    logits = fn.base_dist.logits
    want = pyro.distributions.Bernoulli(logits=logits).to_event(1).log_prob(x)
    assert torch.allclose(fn.log_prob(x), want, rtol=1e-13)


def test_gaussian_likelihood_scores_grey_data():
    vae = _vae(likelihood="gaussian")
    x = torch.rand(3, 144, dtype=torch.float64)
    _, model = _traces(vae, x)
    assert model.nodes["x"]["fn"].base_dist.scale.shape == (3, 144)
    assert vae.sample(2).shape == (2, 144)


def test_active_units_count_every_pixel_and_channel():
    vae, x = _vae(), _x(8)
    out = active_units(vae.model, vae.guide, x, num_samples=2)
    assert out["z1"]["units"] == 2 * 6 * 6 and out["z2"]["units"] == 3 * 3 * 3
    assert out["z1"]["variance"].shape == (2 * 6 * 6,)  # flattened channel-major


def test_batch_norm_variant_runs():
    vae, x = _vae(batch_norm=True), _x()
    loss = make_elbo("elbo").loss(vae.model, vae.guide, x)
    assert torch.isfinite(torch.as_tensor(loss))


def test_bad_data_and_config_are_refused():
    vae = _vae()
    with pytest.raises(DataError, match=r"\(batch, 144\)"):
        vae.model(torch.zeros(2, 100, dtype=torch.float64))
    with pytest.raises(DataError, match="binary"):
        vae.model(torch.full((2, 144), 0.5, dtype=torch.float64))
    with pytest.raises(DataError, match="unconditional"):
        vae.check_data(_x(), c=torch.zeros(4))
    assert vae.split(_x())[1] is None and vae.condition_dim == 0
    with pytest.raises(ConfigError, match="unknown config key"):
        ConvLadderVAE(image_shap=(8, 8))
    with pytest.raises(ConfigError, match="one of each"):
        ConvLadderConfig(channels=(4, 4), latent_channels=(2,))
    with pytest.raises(ConfigError, match="unknown preset"):
        conv_preset("conv-mnst")


def test_conv_mnist_preset():
    c = conv_preset("conv-mnist")
    assert c.depth == 3 and c.x_dim == 784
    assert resolutions(c.image_shape, c.depth) == [(14, 14), (7, 7), (4, 4)]
    assert ConvLadderConfig.from_dict(c.to_dict()) == c


def test_fit_trains_it_with_warm_up_and_free_bits():
    """fit's loop (KL warm-up through LatentWeight, the monitor's per-site KL) serves the
    conv pair; FreeBits around the loop floors every step's objective."""
    from pyro_ladder import FreeBits, fit

    vae, x = _vae(dtype=torch.float32), _x(32, torch.float32)
    with FreeBits(0.05):
        history = fit(
            vae.model,
            vae.guide,
            x,
            epochs=2,
            batch_size=8,
            warmup_epochs=2,
            monitor=x[:8],
            progress=False,
        )
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)


@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
def test_every_tensor_follows_the_data_device(inference):
    """On the meta device a tensor made on the CPU by mistake would fail to mix with the
    rest (the data checks need values, so the networks' model and guide are called)."""
    vae = _vae(inference, dtype=torch.float32).to("meta")
    x = torch.zeros(4, 144, device="meta")
    with pyro.validation_enabled(False):
        guide = poutine.trace(vae.inference.guide).get_trace(x, vae.generative)
        model = poutine.trace(poutine.replay(vae.generative.model, trace=guide)).get_trace(x)
        model.compute_log_prob()
    assert all(model.nodes[n]["log_prob"].device.type == "meta" for n in ("z2", "z1", "x"))


def test_run_layer_pictures_serve_it(tmp_path):
    """The run folder's samples and reconstructions (what `train` and `report` draw)."""
    from pyro_ladder.runs import folder

    vae, x = _vae(dtype=torch.float32), _x(40, torch.float32)
    folder.write_pictures(tmp_path, vae, x, (12, 12), [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reconstructions.png", "samples.png"]
