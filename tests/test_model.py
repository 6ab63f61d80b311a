import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_ladder import ConfigError, DataError, LadderConfig, LadderVAE, preset


def _traces(vae, x, particles=None):
    def run():
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
        return guide_trace, model_trace

    if particles is None:
        return run()
    with pyro.plate("particles", particles, dim=-2):
        return run()


@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_site_shapes_for_every_depth(depth, inference):
    latent = (12, 10, 8, 6, 4)[:depth]
    hidden = (32, 24, 16, 12, 8)[:depth]
    vae = LadderVAE(20, latent, hidden, inference=inference)
    x = (torch.rand(7, 20) < 0.5).float()
    guide_trace, model_trace = _traces(vae, x, particles=3)
    names = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and n != "data"]
    assert names == [f"z{i}" for i in range(depth, 0, -1)] + ["x"]  # top-down order
    for i, k in enumerate(latent, start=1):
        assert guide_trace.nodes[f"z{i}"]["value"].shape == (3, 7, k)
        site = model_trace.nodes[f"z{i}"]
        assert site["fn"].log_prob(site["value"]).shape == (3, 7)
    assert model_trace.nodes["x"]["fn"].batch_shape == (3, 7)
    assert model_trace.nodes["x"]["fn"].event_shape == (20,)
    guide_names = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample"
                   and n != "data"]
    expected = [f"z{i}" for i in range(1, depth + 1)]
    assert guide_names == (expected[::-1] if inference == "top-down" else expected)


def test_top_down_guide_uses_the_model_prior_networks():
    vae = LadderVAE(10, (4, 3), (16, 8))
    guide_trace, _ = _traces(vae, torch.zeros(5, 10))
    guide_params = {n for n, s in guide_trace.nodes.items() if s["type"] == "param"}
    assert any(".generative$$$priors.0." in n for n in guide_params)
    assert not any("likelihood" in n for n in guide_params)


@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
def test_one_layer_model_is_a_plain_vae(inference):
    torch.manual_seed(1)
    vae = LadderVAE(6, (3,), (8,), inference=inference, batch_norm=False).double()
    x = (torch.rand(4, 6) < 0.5).double()
    guide_trace, model_trace = _traces(vae, x)
    z = guide_trace.nodes["z1"]["value"]
    # the same quantities written as a plain VAE: q(z|x) = N(enc(x)), p(z) = N(0, I),
    # p(x|z) = Bernoulli(dec(z))
    if inference == "top-down":
        loc, scale = vae.inference.heads[0](vae.inference.blocks[0](x))
    else:
        loc, scale = vae.inference.blocks[0](x)
    lik = vae.generative.likelihood
    log_q = dist.Normal(loc, scale).log_prob(z).sum(-1)
    log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_px = dist.Bernoulli(logits=lik.logits(lik.mlp(z))).log_prob(x).sum(-1)
    torch.testing.assert_close(guide_trace.nodes["z1"]["fn"].log_prob(z), log_q)
    torch.testing.assert_close(model_trace.nodes["z1"]["fn"].log_prob(z), log_pz)
    torch.testing.assert_close(model_trace.nodes["x"]["fn"].log_prob(x), log_px)


def test_top_down_and_bottom_up_coincide_for_one_layer():
    td = LadderVAE(6, (3,), (8,), inference="top-down")
    bu = LadderVAE(6, (3,), (8,), inference="bottom-up")
    bu.generative.load_state_dict(td.generative.state_dict())
    bu.inference.blocks[0].mlp.load_state_dict(td.inference.blocks[0].state_dict())
    bu.inference.blocks[0].head.load_state_dict(td.inference.heads[0].state_dict())
    x = torch.rand(5, 6).round()
    for vae in (td, bu):
        vae.eval()
    g_td, _ = _traces(td, x)
    g_bu, _ = _traces(bu, x)
    torch.testing.assert_close(g_td.nodes["z1"]["fn"].base_dist.loc,
                               g_bu.nodes["z1"]["fn"].base_dist.loc)
    torch.testing.assert_close(g_td.nodes["z1"]["fn"].base_dist.scale,
                               g_bu.nodes["z1"]["fn"].base_dist.scale)


def test_bernoulli_likelihood_scores_with_the_librarys_bernoulli():
    """The ladder's binary pixels go through likelihoods.Bernoulli: Pyro's density."""
    from pyro_ladder.likelihoods import Bernoulli

    vae = LadderVAE(6, (3, 2), (8, 4)).double()
    x = torch.rand(5, 6, dtype=torch.float64).round()
    _, model_trace = _traces(vae, x)
    fn = model_trace.nodes["x"]["fn"]
    assert type(fn.base_dist) is Bernoulli and fn.event_shape == (6,)
    want = dist.Bernoulli(logits=fn.base_dist.logits).to_event(1).log_prob(x)
    assert torch.allclose(fn.log_prob(x), want, rtol=1e-13)


def test_gaussian_likelihood_scores_continuous_data():
    vae = LadderVAE(6, (3, 2), (8, 4), likelihood="gaussian")
    x = torch.rand(5, 6)
    _, model_trace = _traces(vae, x)
    assert isinstance(model_trace.nodes["x"]["fn"].base_dist, dist.Normal)
    assert torch.isfinite(model_trace.log_prob_sum())


def test_two_instances_do_not_share_parameters_through_pyro():
    a, b = LadderVAE(6, (3,), (8,)), LadderVAE(6, (3,), (8,))
    x = torch.rand(4, 6).round()
    _traces(a, x)
    guide_trace, _ = _traces(b, x)
    b_params = {id(p) for p in b.parameters()}
    traced = [s["value"] for s in guide_trace.nodes.values() if s["type"] == "param"]
    assert traced and all(id(v) in b_params for v in traced)


def test_sample_and_reconstruct_shapes_and_range():
    vae = LadderVAE(6, (3, 2), (8, 4))
    assert vae.sample(9).shape == (9, 6)
    rec = vae.reconstruct(torch.rand(4, 6).round())
    assert rec.shape == (4, 6) and ((rec >= 0) & (rec <= 1)).all()
    assert vae.training  # the mode is restored


def test_bernoulli_model_rejects_non_binary_data():
    vae = LadderVAE(4, (2,), (8,))
    with pytest.raises(DataError, match="binary"):
        vae.model(torch.full((3, 4), 0.5))


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.uint8,
              torch.int8, torch.int64, torch.bool]
)  # fmt: skip
def test_is_binary_agrees_with_comparing_each_value_to_0_and_1(dtype):
    """The data check's one-pass test against the plain comparison, value by value, on the
    values where a formula could slip: NaN, infinities, subnormals, the neighbours of 0
    and 1, -0, the largest values, and every value of the small integer types."""
    from pyro_ladder.likelihoods import is_binary

    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        one = torch.tensor(1.0, dtype=dtype)
        near_one = [torch.nextafter(one, one * 2).item(), torch.nextafter(one, one * 0).item()]
        values = [0.0, -0.0, 1.0, 0.5, 2.0, -1.0, float("nan"), float("inf"), -float("inf"),
                  info.tiny, info.tiny * info.eps, -info.tiny, info.max, -info.max, info.eps,
                  *near_one]  # fmt: skip
        candidates = torch.tensor(values, dtype=dtype)
    elif dtype == torch.bool:
        candidates = torch.tensor([False, True])
    elif dtype in (torch.uint8, torch.int8):
        info = torch.iinfo(dtype)
        candidates = torch.arange(info.min, info.max + 1).to(dtype)
    else:
        candidates = torch.tensor([0, 1, -1, 2, 2**32, 2**32 + 1, 2**62, -(2**63)], dtype=dtype)
    for value in candidates:
        for x in (value.reshape(1), torch.stack([candidates.new_zeros(()), value]).expand(3, 2)):
            truth = bool(((x == 0) | (x == 1)).all())
            assert is_binary(x) == truth, (dtype, value)


def test_model_rejects_wrong_number_of_features():
    vae = LadderVAE(4, (2,), (8,))
    with pytest.raises(DataError, match="x_dim=4"):
        vae.model(torch.zeros(3, 5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(latent_dims=(4, 0), hidden_dims=(8, 8)), "positive integers"),
        (dict(latent_dims=(4, -2), hidden_dims=(8, 8)), "positive integers"),
        (dict(latent_dims=(4, 2), hidden_dims=(8,)), "one hidden size per stochastic layer"),
        (dict(latent_dims=(), hidden_dims=()), "empty"),
        (dict(likelihood="poisson"), "unknown likelihood"),
        (dict(inference="sideways"), "unknown inference"),
        (dict(latent_dims=(2.5,), hidden_dims=(8,)), "positive integers"),
    ],
)
def test_bad_configurations_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LadderVAE(4, **kwargs)


def test_config_rejects_unknown_keys_and_round_trips():
    cfg = preset("paper-mnist", 784)
    assert cfg.latent_dims == (64, 32, 16, 8, 4) and cfg.hidden_dims == (512, 256, 128, 64, 32)
    assert LadderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config key"):
        LadderConfig.from_dict({**cfg.to_dict(), "latent_dim": [3]})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("paper", 784)


def test_the_ladders_normal_is_pyros_normal_with_a_shorter_log_prob():
    """layers.Normal computes log N(z; loc, scale) in fewer operations: the same density
    as Pyro's Normal (float64, scales from 1e-3 to 1e3, broadcast parameters), the same
    draws from the same seed, and Pyro's shape handling and KL divergences."""
    from pyro_ladder.layers import Normal, gaussian

    torch.manual_seed(0)
    loc = torch.randn(7, 5, dtype=torch.float64) * 10
    scale = torch.logspace(-3, 3, 35, dtype=torch.float64).reshape(7, 5)
    z = torch.randn(3, 7, 5, dtype=torch.float64) * 5
    ours, pyros = Normal(loc, scale), dist.Normal(loc, scale)
    assert torch.allclose(ours.log_prob(z), pyros.log_prob(z), rtol=1e-13, atol=1e-12)
    top = Normal(torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
    want = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert torch.allclose(top.to_event(1).log_prob(z), want, rtol=1e-13)
    site = gaussian(loc, scale)  # the ladder's sites: to_event(1), argument checks off
    assert type(site.base_dist) is Normal and site.event_shape == (5,)
    torch.manual_seed(1)
    draw = site.rsample((2,))
    torch.manual_seed(1)
    assert torch.equal(draw, dist.Normal(loc, scale).to_event(1).rsample((2,)))
    wide = site.expand((4, 7))
    assert type(wide.base_dist) is Normal and wide.batch_shape == (4, 7)
    assert torch.equal(wide.log_prob(z[0]), site.log_prob(z[0]).expand(4, 7))
    same = site.expand((7,))  # what Pyro's plates ask of most sites: no views
    assert same.base_dist.loc is loc and same.base_dist.scale is scale
    assert same.base_dist is not site.base_dist and not same.base_dist._validate_args
    checked = Normal(loc, scale, validate_args=True)  # argument checks as Pyro's
    assert checked.expand((7, 5))._validate_args
    with pytest.raises(ValueError, match="scale"):
        Normal(loc, -scale, validate_args=True)
    other = gaussian(loc * 0.5, scale * 2)
    kl = torch.distributions.kl_divergence(site, other)
    want = torch.distributions.kl_divergence(
        dist.Normal(loc, scale).to_event(1), dist.Normal(loc * 0.5, scale * 2).to_event(1)
    )
    assert torch.allclose(kl, want, rtol=1e-13)


def test_a_normal_subclass_with_settings_of_its_own_is_not_rebuilt_without_them():
    """layers.Normal's expand builds its own class without __init__; a subclass with its
    own __init__ (settings the copy would lose) gets torch's rule instead: refused."""
    from pyro_ladder.layers import Normal

    class Tempered(Normal):
        t = 1.0

        def __init__(self, loc, scale, t):
            super().__init__(loc, scale)
            self.t = t

    d = Tempered(torch.zeros(3), torch.ones(3), 2.0)
    with pytest.raises(NotImplementedError):
        d.expand((4, 3))


def test_the_likelihoods_bernoulli_is_pyros_bernoulli_with_a_vectorized_log_prob():
    """likelihoods.Bernoulli scores logits as relu(l) - x l + log(1 + exp(-|l|)): Pyro's
    density and first and second derivatives in float64 (logits from -40 to 40, data
    broadcast against particles, fractional values too), float32 as close to the truth as
    torch's own, and Pyro's draws, expand, checks and probs-built scoring."""
    import torch.nn.functional as F

    from pyro_ladder.likelihoods import Bernoulli

    torch.manual_seed(0)
    logits = torch.cat([torch.linspace(-40, 40, 401), torch.randn(39) * 5]).reshape(2, 11, 20)
    logits = logits.double().requires_grad_()
    for x in ((torch.rand(11, 20) < 0.4).double(), torch.rand(11, 20, dtype=torch.float64)):
        ours = Bernoulli(logits=logits, validate_args=False).to_event(1).log_prob(x)
        pyros = dist.Bernoulli(logits=logits, validate_args=False).to_event(1).log_prob(x)
        assert ours.shape == (2, 11)
        assert torch.allclose(ours, pyros, rtol=1e-13, atol=1e-12)
        g_ours = torch.autograd.grad(ours.sum(), logits, create_graph=True)[0]
        g_pyros = torch.autograd.grad(pyros.sum(), logits, create_graph=True)[0]
        assert torch.allclose(g_ours, g_pyros, rtol=1e-13, atol=1e-15)
        h_ours = torch.autograd.grad((g_ours**3).sum(), logits)[0]
        h_pyros = torch.autograd.grad((g_pyros**3).sum(), logits)[0]
        assert torch.allclose(h_ours, h_pyros, rtol=1e-12, atol=1e-15)
    value = torch.rand(11, 20, dtype=torch.float64, requires_grad=True)  # a value with a grad
    score = lambda lg, v: Bernoulli(logits=lg, validate_args=False).log_prob(v)  # noqa: E731
    assert torch.autograd.gradcheck(
        score, (logits[:, :3, :4].detach().requires_grad_(), value[:3, :4])
    )
    assert torch.autograd.gradgradcheck(
        score, (logits[:, :2, :3].detach().requires_grad_(), value[:2, :3])
    )

    # float32: no further from the float64 truth (log sigmoid written out) than torch's own
    l64 = logits.detach()
    for x in (
        torch.zeros(2, 11, 20, dtype=torch.float64),
        torch.ones(2, 11, 20, dtype=torch.float64),
    ):
        truth = x * F.logsigmoid(l64) + (1 - x) * F.logsigmoid(-l64)
        ours = Bernoulli(logits=l64.float()).log_prob(x.float()).double()
        torchs = -F.binary_cross_entropy_with_logits(l64.float(), x.float(), reduction="none")
        assert (ours - truth).abs().max() <= max(1e-6, 1.25 * (torchs.double() - truth).abs().max())

    d = Bernoulli(logits=l64[0, 0])
    torch.manual_seed(3)
    draw = d.sample((5,))
    torch.manual_seed(3)
    assert torch.equal(draw, dist.Bernoulli(logits=l64[0, 0]).sample((5,)))
    wide = d.expand((4, 20))
    assert type(wide) is Bernoulli and wide._validate_args
    assert torch.equal(wide.log_prob(draw[0]), d.log_prob(draw[0]).expand(4, 20))
    with pytest.raises(ValueError, match="support"):
        d.log_prob(torch.full((20,), 0.5, dtype=torch.float64))  # Pyro's checks, when on
    probs = torch.rand(20, dtype=torch.float64)
    assert torch.allclose(
        Bernoulli(probs=probs).log_prob(draw[0]),
        dist.Bernoulli(probs=probs).log_prob(draw[0]),
        rtol=1e-15,
    )
    assert torch.equal(d.enumerate_support(), dist.Bernoulli(logits=l64[0, 0]).enumerate_support())
    from_probs = Bernoulli(probs=probs)
    assert from_probs.logits.shape == (20,)  # computed and kept: still scored from probs
    assert torch.equal(from_probs.log_prob(draw[0]), dist.Bernoulli(probs=probs).log_prob(draw[0]))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_the_likelihoods_bernoulli_scores_half_precision_logits_in_float32(low):
    """Under autocast a Linear layer's logits are bfloat16 or float16; the library's
    Bernoulli scores them in float32, as torch's does there. In half precision
    1 + exp(-|l|) rounds to 1 for confident pixels, and the log-likelihood came out tenths
    of a nat per image too high (a review found +0.41 on average in bfloat16)."""
    from pyro_ladder.likelihoods import Bernoulli

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 784)
    with torch.no_grad():
        layer.bias.fill_(-6.0)  # mostly confident background pixels, as MNIST's
    h = torch.randn(32, 16)
    x = (torch.rand(32, 784) < 0.01).float()
    with torch.autocast("cpu", dtype=low):
        logits = layer(h)
        assert logits.dtype == low
        ours = Bernoulli(logits=logits, validate_args=False).to_event(1).log_prob(x)
        torchs = dist.Bernoulli(logits=logits, validate_args=False).to_event(1).log_prob(x)
    truth = dist.Bernoulli(logits=logits.double()).to_event(1).log_prob(x.double())
    assert ours.dtype == torch.float32
    assert (ours.double() - truth).abs().max() < 1e-3
    assert (ours.double() - truth).abs().max() <= 2 * (torchs.double() - truth).abs().max() + 1e-4
    grad = torch.autograd.grad(ours.sum(), logits)[0]  # back to the layer's dtype
    assert grad.dtype == low
