"""miwae-dreg, piwae-dreg, rws, rws-dreg and vimco: identities, unbiasedness against their
reference estimators, closed-form limits, and what they refuse (issue 15.2)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from pyro_ladder import ConfigError, LadderVAE, make_elbo
from pyro_ladder.elbo.vimco import VIMCO, leave_one_out_bounds


def _loss_and_grads(elbo, params, model, guide, x, seed=3):
    for p in params:
        p.grad = None
    pyro.set_rng_seed(seed)
    loss = elbo.loss_and_grads(model, guide, x)
    return loss, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def _ladder_draws(name, particles, repeats=24, rows=2048, **options):
    """``repeats`` independent mean gradients of a float64 ladder, each over ``rows`` iid
    draws: ``(R, P)``, and which entries belong to the inference network."""
    pyro.clear_param_store()
    torch.manual_seed(11)
    vae = LadderVAE(4, (2, 2), (5, 5), batch_norm=False).double()
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64).expand(rows, 4)
    elbo = make_elbo(name, particles, max_plate_nesting=1, **options)
    params = list(vae.parameters())
    draws = [
        torch.cat(
            [
                g.flatten()
                for g in _loss_and_grads(elbo, params, vae.model, vae.guide, x, seed=100 + r)[1]
            ]
        )
        / rows
        for r in range(repeats)
    ]
    kinds = torch.cat(
        [torch.full((p.numel(),), n.startswith("inference")) for n, p in vae.named_parameters()]
    )
    return torch.stack(draws), kinds


def _z_scores(a, b):
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    return (a.mean(0) - b.mean(0)).abs() / (se + 1e-12)


@pytest.mark.parametrize(
    "ours, options, reference, ref_options",
    [
        ("miwae-dreg", {"outer": 2}, "miwae", {"outer": 2}),
        ("miwae-dreg", {"outer": 2, "shared": "dreg"}, "miwae", {"outer": 2}),
        ("piwae-dreg", {"outer": 2}, "piwae", {"outer": 2}),
        ("rws-dreg", {}, "rws", {}),
    ],
)
def test_unbiased_against_the_reference_for_every_parameter(ours, options, reference, ref_options):
    mine, kinds = _ladder_draws(ours, 4, **options)
    ref, _ = _ladder_draws(reference, 4, **ref_options)
    assert _z_scores(mine, ref).max() < 5.0
    assert kinds.any() and (~kinds).any()
    assert not torch.allclose(mine[:, kinds], ref[:, kinds])  # a different estimator


def test_the_check_flags_a_biased_guide_term():
    """rws's wake-phi is not IWAE's guide gradient: the same check must say so."""
    mine, kinds = _ladder_draws("rws", 4)
    ref, _ = _ladder_draws("iwae", 4)
    assert _z_scores(mine, ref)[kinds].max() > 8.0


def test_miwae_dreg_with_one_bound_is_iwae_dreg(vae, x):
    params = list(vae.parameters())
    for shared in ("iwae", "dreg"):
        m = _loss_and_grads(
            make_elbo("miwae-dreg", 4, outer=1, shared=shared, max_plate_nesting=1),
            params,
            vae.model,
            vae.guide,
            x,
        )
        i = _loss_and_grads(
            make_elbo("iwae-dreg", 4, shared=shared, max_plate_nesting=1),
            params,
            vae.model,
            vae.guide,
            x,
        )
        assert m[0] == pytest.approx(i[0], rel=1e-12)
        for a, b in zip(m[1], i[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_piwae_dreg_decoder_is_iwae_mk_and_loss_is_iwae_mk(vae, x):
    params = list(vae.parameters())
    loss, mine = _loss_and_grads(
        make_elbo("piwae-dreg", 3, outer=2, max_plate_nesting=1), params, vae.model, vae.guide, x
    )
    iwae = RenyiELBO(alpha=0, num_particles=6, vectorize_particles=True, max_plate_nesting=1)
    ref_loss, ref = _loss_and_grads(iwae, params, vae.model, vae.guide, x)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for (name, _), g, r in zip(vae.named_parameters(), mine, ref, strict=True):
        if not name.startswith("inference"):  # likelihood and prior networks: decoder
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_rws_wake_theta_is_the_iwae_gradient_of_model_only_parameters(vae, x):
    params = list(vae.parameters())
    iwae = RenyiELBO(alpha=0, num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    ref_loss, ref = _loss_and_grads(iwae, params, vae.model, vae.guide, x)
    for name in ("rws", "rws-dreg"):
        loss, mine = _loss_and_grads(
            make_elbo(name, 5, max_plate_nesting=1), params, vae.model, vae.guide, x
        )
        assert loss == pytest.approx(ref_loss, rel=1e-12)  # the loss is the IWAE bound
        checked = 0
        for (n, _), g, r in zip(vae.named_parameters(), mine, ref, strict=True):
            if n.startswith("generative.likelihood"):
                torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
                checked += 1
        assert checked


def test_rws_shared_theta_gives_shared_parameters_wake_theta_alone(vae, x):
    params = list(vae.parameters())
    runs = {
        (name, shared): _loss_and_grads(
            make_elbo(name, 5, shared=shared, max_plate_nesting=1), params, vae.model, vae.guide, x
        )[1]
        for name in ("rws", "rws-dreg")
        for shared in ("both", "theta")
    }
    for i, (n, _) in enumerate(vae.named_parameters()):
        if n.startswith("inference"):  # the guide's own: wake-phi, as by default
            for name in ("rws", "rws-dreg"):
                torch.testing.assert_close(runs[name, "theta"][i], runs[name, "both"][i])
        else:  # model and shared prior networks: wake-theta alone, the same for both
            torch.testing.assert_close(
                runs["rws", "theta"][i], runs["rws-dreg", "theta"][i], rtol=1e-9, atol=1e-12
            )
    prior = [i for i, (n, _) in enumerate(vae.named_parameters()) if "prior" in n]
    assert prior and not torch.allclose(
        runs["rws", "theta"][prior[0]], runs["rws", "both"][prior[0]]
    )
    with pytest.raises(ConfigError, match="shared"):
        make_elbo("rws", 2, shared="dreg")


class _Conjugate(PyroModule):
    """``z ~ N(0, 1)``, ``x | z ~ N(z + b, 1)``; guide ``q(z) = N(m, s)``. Posterior
    ``N((x - b) / 2, 1/2)``, ``p(x) = N(b, 2)``."""

    def __init__(self):
        super().__init__()
        self.b = PyroParam(torch.tensor(0.3, dtype=torch.float64))
        self.m = PyroParam(torch.tensor(0.1, dtype=torch.float64))
        self.s = PyroParam(torch.tensor(0.9, dtype=torch.float64), constraints.positive)

    def forward(self, x, which):  # a PyroModule registers its parameters inside its call
        return getattr(self, "_" + which)(x)

    def model(self, x):
        self(x, "model")

    def guide(self, x):
        self(x, "guide")

    def _model(self, x):
        b = self.b
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z + b, 1.0), obs=x)

    def _guide(self, x):
        m, s = self.m, self.s
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(m.expand(x.shape), s))


@pytest.mark.parametrize("name", ["rws", "rws-dreg"])
def test_rws_at_large_k_follows_the_closed_form_gradients(name):
    """Wake-phi -> -d KL(p(z | x) || q) and wake-theta -> d log p(x) as K grows."""
    pair = _Conjugate()
    x = torch.full((256,), 1.0, dtype=torch.float64)
    pyro.set_rng_seed(0)
    make_elbo(name, 512, max_plate_nesting=1).loss_and_grads(pair.model, pair.guide, x)
    store = dict(pyro.get_param_store().named_parameters())
    b, m, s = 0.3, 0.1, 0.9
    mu, var = (1.0 - b) / 2, 0.5
    # -KL(N(mu, var) || N(m, s^2)) in m and in log s (the unconstrained parameter)
    want = {"m": (mu - m) / s**2, "s": (var + (mu - m) ** 2) / s**2 - 1, "b": (1.0 - b) / 2}
    for key, value in want.items():
        got = -store[key].grad.item() / len(x)
        assert got == pytest.approx(value, abs=0.03), key


# ---- vimco on a pair with a discrete and a reparameterized latent ----


class _Discrete(PyroModule):
    """``c ~ Cat(pi)``, ``z | c ~ N(mu_c, 1)``, ``x | z ~ N(W z, 0.5)``; guide
    ``q(c | x) = Cat(A x + a)`` (score function), ``q(z | c, x) = N(B x + e_c, s)``
    (reparameterized below the discrete site)."""

    def __init__(self, C=3, D=2):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.5  # noqa: E731
        self.pi = PyroParam(r(C))
        self.mu = PyroParam(r(C) * 3)
        self.W = PyroParam(r(D) + 1)
        self.A, self.a = PyroParam(r(C, D)), PyroParam(r(C))
        self.B, self.e = PyroParam(r(D)), PyroParam(r(C))
        self.s = PyroParam(torch.tensor(0.7, dtype=torch.float64), constraints.positive)

    forward, model, guide = _Conjugate.forward, _Conjugate.model, _Conjugate.guide

    def _model(self, x):
        pi, mu, W = self.pi, self.mu, self.W
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=pi))
            z = pyro.sample("z", dist.Normal(mu[c], 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * W, 0.5).to_event(1), obs=x)

    def _guide(self, x):
        A, a, B, e, s = self.A, self.a, self.B, self.e, self.s
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=x @ A.T + a))
            pyro.sample("z", dist.Normal(x @ B + e[c], s))


class _ScoreIWAE(VIMCO):
    """The plain score-function gradient of the IWAE bound: no baseline."""

    def learning_signal(self, log_w):
        return (log_w.logsumexp(0) - math.log(log_w.shape[0])).expand_as(log_w)


def _discrete_draws(elbo, repeats=24, rows=1024):
    pyro.clear_param_store()
    pair = _Discrete()
    torch.manual_seed(8)
    x = (torch.randn(1, 2, dtype=torch.float64) * 2).expand(rows, 2)
    pair.model(x[:1]), pair.guide(x[:1])  # register every parameter
    params = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
    draws = [
        torch.cat(
            [
                g.flatten()
                for g in _loss_and_grads(elbo, params, pair.model, pair.guide, x, seed=50 + r)[1]
            ]
        )
        / rows
        for r in range(repeats)
    ]
    return torch.stack(draws)


def test_vimco_is_unbiased_and_less_noisy_than_the_plain_score_function():
    vimco = _discrete_draws(VIMCO(4, max_plate_nesting=1))
    score = _discrete_draws(_ScoreIWAE(4, max_plate_nesting=1))
    assert _z_scores(vimco, score).max() < 5.0
    assert vimco.var(0).sum() < 0.5 * score.var(0).sum()


def test_vimco_without_discrete_sites_is_the_iwae_gradient(vae, x):
    params = list(vae.parameters())
    iwae = RenyiELBO(alpha=0, num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    ref_loss, ref = _loss_and_grads(iwae, params, vae.model, vae.guide, x)
    loss, mine = _loss_and_grads(
        make_elbo("vimco", 4, max_plate_nesting=1), params, vae.model, vae.guide, x
    )
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for g, r in zip(mine, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_rws_trains_a_discrete_guide_and_its_model_gradient_is_vimco_s():
    """Both give model-only parameters ``sum_k w_bar_k d log p``, draw by draw."""
    pyro.clear_param_store()
    pair = _Discrete()
    x = torch.randn(6, 2, dtype=torch.float64)
    pair.model(x), pair.guide(x)
    store = dict(pyro.get_param_store().named_parameters())
    params = [store[n] for n in ("pi", "mu", "W")]
    _, rws = _loss_and_grads(
        make_elbo("rws", 4, max_plate_nesting=1), params, pair.model, pair.guide, x
    )
    _, vimco = _loss_and_grads(
        make_elbo("vimco", 4, max_plate_nesting=1), params, pair.model, pair.guide, x
    )
    for a, b in zip(rws, vimco, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert a.abs().sum() > 0


def test_leave_one_out_bounds_by_hand():
    log_w = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    w = log_w.exp().squeeze(-1)
    by_hand = []
    for k in range(3):
        others = [j for j in range(3) if j != k]
        geometric = math.exp(sum(log_w[j, 0].item() for j in others) / 2)
        by_hand.append(math.log((sum(w[j].item() for j in others) + geometric) / 3))
    got = leave_one_out_bounds(log_w).squeeze(-1)
    torch.testing.assert_close(got, torch.tensor(by_hand, dtype=torch.float64))


@pytest.mark.parametrize("name", ["miwae-dreg", "piwae-dreg", "rws-dreg"])
def test_reparameterized_only_estimators_refuse_the_discrete_site_by_name(name):
    pair = _Discrete()
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"'c'.*Categorical"):
        make_elbo(name, 2).loss_and_grads(pair.model, pair.guide, x)


def test_vimco_refuses_one_particle_and_bad_options():
    with pytest.raises(ConfigError, match="num_particles >= 2"):
        make_elbo("vimco", 1, max_plate_nesting=1)
    with pytest.raises(ConfigError, match="shared"):
        make_elbo("miwae-dreg", 2, shared="both")
    with pytest.raises(ConfigError, match="outer"):
        make_elbo("piwae-dreg", 2, outer=0, max_plate_nesting=1)


# ---- bad calls: the argument is named (issue 15.4) ----


def test_gradient_snr_with_its_arguments_swapped_names_the_argument(vae, x):
    from pyro_ladder import DataError
    from pyro_ladder.diagnostics import gradient_snr

    elbo = make_elbo("iwae", 4)
    with pytest.raises(ConfigError, match="elbo must be an estimator"):
        gradient_snr(vae.model, vae.guide, x, elbo)
    with pytest.raises(ConfigError, match="guide must be the pair's guide"):
        gradient_snr(vae.model, elbo, vae.guide, x)
    with pytest.raises(DataError, match="data must be a torch.Tensor"):
        gradient_snr(vae.model, vae.guide, elbo, x.tolist())


def test_estimators_evaluate_and_diagnostics_name_a_misplaced_argument(vae, x):
    from pyro_ladder import DataError, evaluate
    from pyro_ladder.diagnostics import effective_sample_size, kl_per_unit, mutual_information
    from pyro_ladder.elbo.surrogate import differentiable_loss

    elbo = make_elbo("rws", 2)
    with pytest.raises(ConfigError, match="model must be the pair's model"):
        elbo.loss_and_grads(x, vae.guide)
    with pytest.raises(ConfigError, match="elbo must be an estimator"):
        differentiable_loss(vae.model, elbo, vae.guide, x)
    with pytest.raises(ConfigError, match="guide must be"):
        evaluate(vae.model, x, vae.guide)
    with pytest.raises(DataError, match="at least one data point"):
        effective_sample_size(vae.model, vae.guide, x[:0])
    with pytest.raises(ConfigError, match="guide must be"):
        mutual_information(x, vae.guide)
    with pytest.raises(ConfigError, match="model must be"):
        kl_per_unit(elbo, vae.guide, x)


def _warm_draws(name, beta, repeats=24, rows=2048, **options):
    """:func:`_ladder_draws` with the whole pair under a KL warm-up weight ``beta``."""
    from pyro_ladder import LatentWeight

    pyro.clear_param_store()
    torch.manual_seed(11)
    vae = LadderVAE(4, (2, 2), (5, 5), batch_norm=False).double()
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64).expand(rows, 4)
    elbo = make_elbo(name, 4, max_plate_nesting=1, **options)

    def model(x):
        with LatentWeight(beta):
            vae.model(x)

    def guide(x):
        with LatentWeight(beta):
            vae.guide(x)

    params = list(vae.parameters())
    draws = [
        torch.cat([g.flatten() for g in _loss_and_grads(elbo, params, model, guide, x, 100 + r)[1]])
        / rows
        for r in range(repeats)
    ]
    return torch.stack(draws)


@pytest.mark.parametrize("beta", [0.0, torch.tensor(0.3, dtype=torch.float64)])
@pytest.mark.parametrize(
    "ours, options, reference, ref_options",
    [
        ("iwae-dreg", {}, "iwae", {}),
        ("iwae-dreg", {"shared": "dreg"}, "iwae", {}),
        ("miwae-dreg", {"outer": 2}, "miwae", {"outer": 2}),
        ("piwae-dreg", {"outer": 2}, "piwae", {"outer": 2}),
        ("rws-dreg", {}, "rws", {}),
    ],
)
def test_unbiased_under_kl_warm_up(beta, ours, options, reference, ref_options):
    """Under a warm-up weight beta < 1 the guide density enters log w tempered, and the DReG
    path coefficient must say so (c_path = c((1 - beta) + beta w_bar), beta (w_bar - w_bar^2)
    for rws-dreg). With w_bar^2 alone iwae-dreg was 20 to 30 standard errors off at beta = 0."""
    mine = _warm_draws(ours, beta, **options)
    ref = _warm_draws(reference, beta, **ref_options)
    assert _z_scores(mine, ref).max() < 5.0


def test_dreg_refuses_layers_warmed_up_apart(vae, x):
    from pyro import poutine

    from pyro_ladder.elbo.weighted import common_kl_weight

    trace = poutine.trace(poutine.scale(vae.guide, scale=0.5)).get_trace(x)
    assert common_kl_weight(trace) == 0.5
    trace.nodes["z1"]["scale"] = 0.25  # one layer weighted apart from the other
    with pytest.raises(ConfigError, match="one KL weight for every latent"):
        common_kl_weight(trace)


class _SubsampledPair(torch.nn.Module):
    """A Gaussian pair with an encoder and a decoder network on N = 12 points, a batch of
    them chosen by ``pyro.plate("data", N, subsample=idx)`` (scale N / B)."""

    def __init__(self, subsample=True):
        super().__init__()
        self.enc, self.dec = torch.nn.Linear(1, 2), torch.nn.Linear(1, 1)
        self.x = torch.linspace(-2, 2, 12)
        self.subsample = subsample  # False: the batch's points as the whole data set

    def _plate(self, idx):
        if self.subsample:
            return pyro.plate("data", 12, subsample=idx)
        return pyro.plate("data", len(idx))

    def model(self, idx):
        pyro.module("dec", self.dec)
        with self._plate(idx):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = self.dec(z.unsqueeze(-1)).squeeze(-1)
            pyro.sample("x", dist.Normal(loc, 1.0), obs=self.x[idx])

    def guide(self, idx):
        pyro.module("enc", self.enc)
        with self._plate(idx):
            out = self.enc(self.x[idx].unsqueeze(-1))
            pyro.sample("z", dist.Normal(out[..., 0], torch.nn.functional.softplus(out[..., 1])))


@pytest.mark.parametrize("pair", ["ladder", "subsampled"])
def test_a_split_surrogate_gives_the_gradients_of_loss_and_grads(pair):
    """iwae-dreg's split surrogate takes its gradients with the loss's factor (-N/B under a
    subsampled data plate) and divides it out: ``loss_and_grads`` (which hands the tensors
    over), ``differentiable_loss(...).backward()`` twice over a retained graph (the same
    gradients twice), and the gradient taken in parts (``autograd.grad`` over the guide's
    parameters with ``retain_graph``, then the model's) all agree, and agree with N/B times
    the gradient of the batch alone."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    if pair == "ladder":
        net = LadderVAE(x_dim=6, latent_dims=(3, 2), hidden_dims=(8, 8), batch_norm=False)
        args = ((torch.rand(5, 6) < 0.5).float(),)
        first = list(net.inference.parameters())
    else:
        net = _SubsampledPair()
        args = (torch.tensor([1, 4, 7, 10]),)  # B = 4 of N = 12: the loss is 3 times the sum
        first = list(net.enc.parameters())
    names = {p: n for n, p in net.named_parameters()}
    elbo = make_elbo("iwae-dreg", 3)
    grads = []
    for call in ("loss_and_grads", "backward twice", "in parts"):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        if call == "loss_and_grads":
            elbo.loss_and_grads(net.model, net.guide, *args)
            grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
            continue
        loss = elbo.differentiable_loss(net.model, net.guide, *args)
        if call == "backward twice":
            loss.backward(retain_graph=True)
            once = {n: p.grad.clone() for n, p in net.named_parameters()}
            loss.backward()
            grads.append({n: p.grad / 2 for n, p in net.named_parameters()})
            for name, grad in once.items():
                assert torch.allclose(grads[-1][name], grad, rtol=1e-6, atol=1e-7), name
        else:
            rest = [p for p in net.parameters() if all(p is not q for q in first)]
            part = torch.autograd.grad(loss, first, retain_graph=True)
            part += torch.autograd.grad(loss, rest)
            grads.append({names[p]: g for p, g in zip(first + rest, part, strict=True)})
    assert grads[0] and all(g.abs().sum() > 0 for g in grads[0].values())
    for found in grads[1:]:
        for name, grad in grads[0].items():
            assert torch.allclose(found[name], grad, rtol=1e-6, atol=1e-7), name
    if pair == "subsampled":  # truth: N / B = 3 times the gradient of the batch alone
        whole = _SubsampledPair(subsample=False)
        whole.load_state_dict(net.state_dict())
        pyro.clear_param_store()  # its modules register under the same names
        torch.manual_seed(1)
        make_elbo("iwae-dreg", 3).loss_and_grads(whole.model, whole.guide, *args)
        for name, p in whole.named_parameters():
            assert torch.allclose(grads[0][name], 3 * p.grad, rtol=1e-5, atol=1e-6), name
