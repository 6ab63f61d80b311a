"""The importance-weighted estimators: exact identities, unbiasedness, variance."""

import concurrent.futures
import functools
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO

from pyro_ladder import ConfigError, LadderVAE, make_elbo


def _loss_and_grads(elbo, vae, x, seed=3):
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    loss = elbo.loss_and_grads(vae.model, vae.guide, x)
    grads = [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in vae.parameters()
    ]
    return loss, grads


def _pyro(name, particles):
    if name == "iwae":
        return RenyiELBO(
            alpha=0, num_particles=particles, vectorize_particles=True, max_plate_nesting=1
        )
    return Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)


@pytest.mark.parametrize(
    "ours, options, particles, reference",
    [
        ("ciwae", {"beta": 0.0}, 8, ("iwae", 8)),
        ("miwae", {"outer": 1}, 8, ("iwae", 8)),
        ("ciwae", {"beta": 1.0}, 8, ("elbo", 8)),
        ("miwae", {"outer": 8}, 1, ("elbo", 8)),
    ],
)
def test_identities_hold_exactly_for_value_and_gradient(
    vae, x, ours, options, particles, reference
):
    mine = make_elbo(ours, particles, max_plate_nesting=1, **options)
    loss, grads = _loss_and_grads(mine, vae, x)
    ref_loss, ref_grads = _loss_and_grads(_pyro(*reference), vae, x)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "ours, reference", [("iwae-dreg", "iwae"), ("iwae-stl", "iwae"), ("stl", "elbo")]
)
def test_loss_values_equal_the_bound_they_estimate(vae, x, ours, reference):
    loss, _ = _loss_and_grads(make_elbo(ours, 8, max_plate_nesting=1), vae, x)
    ref_loss, _ = _loss_and_grads(_pyro(reference, 8), vae, x)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    pyro.set_rng_seed(3)
    value = make_elbo(ours, 8, max_plate_nesting=1).loss(vae.model, vae.guide, x)
    assert value == pytest.approx(ref_loss, rel=1e-12)


def _gradient_draws(name, particles, repeats=24, rows=2048, **options):
    """``repeats`` independent mean gradients, each over ``rows`` iid draws: (R, P)."""
    torch.manual_seed(11)
    vae = LadderVAE(4, (2, 2), (5, 5), batch_norm=False).double()
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64).expand(rows, 4)
    elbo = make_elbo(name, particles, max_plate_nesting=1, **options)
    draws = []
    for r in range(repeats):
        _, grads = _loss_and_grads(elbo, vae, x, seed=100 + r)
        draws.append(torch.cat([g.flatten() for g in grads]) / rows)
    kinds = torch.cat(
        [
            torch.full((p.numel(),), name.startswith("inference"))
            for name, p in vae.named_parameters()
        ]
    )
    return torch.stack(draws), kinds


def _z_scores(a, b):
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    return (a.mean(0) - b.mean(0)).abs() / (se + 1e-12)


@pytest.mark.parametrize(
    "ours, options, reference, particles",
    [
        ("iwae-dreg", {"shared": "dreg"}, "iwae", 8),
        ("iwae-dreg", {"shared": "iwae"}, "iwae", 8),
        ("stl", {}, "elbo", 1),
    ],
)
def test_unbiased_for_every_parameter_shared_ones_included(ours, options, reference, particles):
    mine, kinds = _gradient_draws(ours, particles, **options)
    ref, _ = _gradient_draws(reference, particles)
    z = _z_scores(mine, ref)
    # every parameter, guide-only, model-only and the prior nets the ladder guide shares
    assert z.max() < 5.0, z.max()
    assert kinds.any() and (~kinds).any()


def test_the_unbiasedness_check_detects_a_biased_estimator():
    """iwae-stl drops a term with non-zero mean: the same check must flag it."""
    mine, kinds = _gradient_draws("iwae-stl", 8)
    ref, _ = _gradient_draws("iwae", 8)
    z = _z_scores(mine, ref)
    assert z[kinds].max() > 8.0


def _snr(draws):
    return (draws.mean(0).square().mean() / draws.var(0).mean()).sqrt()


@pytest.mark.parametrize("shared", ["dreg", "iwae"])
def test_dreg_raises_the_guide_gradient_snr_at_k64(shared):
    dreg, kinds = _gradient_draws("iwae-dreg", 64, repeats=16, rows=64, shared=shared)
    iwae, _ = _gradient_draws("iwae", 64, repeats=16, rows=64)
    assert _snr(dreg[:, kinds]) > 1.5 * _snr(iwae[:, kinds])


def test_non_reparameterized_guide_site_is_refused():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(0.3))

    with pytest.raises(ConfigError, match="reparameterized"):
        make_elbo("iwae-dreg", 4).loss_and_grads(model, guide, torch.zeros(3))


@pytest.mark.parametrize("options, message", [({"outer": 0}, "outer"), ({"beta": 2.0}, "beta")])
def test_bad_options(options, message):
    name = "miwae" if "outer" in options else "ciwae"
    with pytest.raises(ConfigError, match=message):
        make_elbo(name, 4, **options)


def test_dreg_leaves_pure_model_parameters_with_the_iwae_gradient(vae, x):
    """For parameters only the model uses, DReG's gradient is IWAE's, draw by draw."""
    _, dreg = _loss_and_grads(make_elbo("iwae-dreg", 8, max_plate_nesting=1), vae, x)
    _, iwae = _loss_and_grads(_pyro("iwae", 8), vae, x)
    names = [n for n, _ in vae.named_parameters()]
    checked = 0
    for name, d, i in zip(names, dreg, iwae, strict=True):
        if name.startswith("generative.likelihood"):
            torch.testing.assert_close(d, i, rtol=1e-9, atol=1e-10)
            checked += 1
        elif name.startswith("inference"):
            assert not torch.allclose(d, i)  # guide parameters do get a different estimate
    assert checked > 0


def test_piwae_gives_encoder_miwae_and_decoder_iwae_gradients(vae, x):
    _, piwae = _loss_and_grads(make_elbo("piwae", 4, outer=2, max_plate_nesting=1), vae, x)
    loss, _ = _loss_and_grads(make_elbo("piwae", 4, outer=2, max_plate_nesting=1), vae, x)
    iwae_loss, iwae = _loss_and_grads(_pyro("iwae", 8), vae, x)
    _, miwae = _loss_and_grads(make_elbo("miwae", 4, outer=2, max_plate_nesting=1), vae, x)
    assert loss == pytest.approx(iwae_loss, rel=1e-12)
    for (name, _), g, i, m in zip(vae.named_parameters(), piwae, iwae, miwae, strict=True):
        expected = m if name.startswith("inference") else i  # prior nets: decoder
        torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-10)


def test_condkl_semigradient_value_and_which_gradients_it_drops(vae, x):
    from pyro.infer import TraceMeanField_ELBO

    loss, sg = _loss_and_grads(make_elbo("elbo-condkl-sg", 4, max_plate_nesting=1), vae, x)
    reference = TraceMeanField_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    ref_loss, full = _loss_and_grads(reference, vae, x)
    assert loss == pytest.approx(ref_loss, rel=1e-12)  # the ELBO with analytic KL
    grads = dict(
        zip([n for n, _ in vae.named_parameters()], zip(sg, full, strict=True), strict=True)
    )
    # z1's head produces no upper sample: its gradient is the ELBO's
    for name in ("inference.heads.0.loc.weight", "generative.likelihood.logits.weight"):
        torch.testing.assert_close(*grads[name], rtol=1e-9, atol=1e-10)
    # z2's head produces the upper sample of KL(q(z1|z2,x) || p(z1|z2)): that path is dropped
    g, f = grads["inference.heads.1.loc.weight"]
    assert not torch.allclose(g, f)


def test_dreg_shared_iwae_splits_the_gradient_by_registration(vae, x):
    _, split = _loss_and_grads(make_elbo("iwae-dreg", 8, max_plate_nesting=1), vae, x)
    _, full = _loss_and_grads(make_elbo("iwae-dreg", 8, shared="dreg", max_plate_nesting=1), vae, x)
    _, iwae = _loss_and_grads(_pyro("iwae", 8), vae, x)
    for (name, _), s, f, i in zip(vae.named_parameters(), split, full, iwae, strict=True):
        expected = f if name.startswith("inference") else i  # prior nets: plain IWAE
        torch.testing.assert_close(s, expected, rtol=1e-9, atol=1e-10)
    with pytest.raises(ConfigError, match="shared"):
        make_elbo("iwae-dreg", 8, shared="both")


def _statistics_after_one_step(name, k=3):
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = LadderVAE(x_dim=6, latent_dims=(3, 2), hidden_dims=(8, 8), batch_norm=True)
    x = (torch.rand(5, 6) < 0.5).float()
    torch.manual_seed(1)
    make_elbo(name, k).loss_and_grads(vae.model, vae.guide, x)
    return {n: b.clone() for n, b in vae.named_buffers()}


@pytest.mark.parametrize("name", ["rws", "elbo-condkl-sg", "stl", "iwae-stl", "ciwae", "piwae"])
def test_batch_norm_moves_its_statistics_once_per_step(name):
    """Estimators that run the model or the guide again at detached samples (rws's and
    the semi-gradient's fixed-sample passes) leave batch norm's running statistics as one
    update of the live pass leaves them: those of an iwae step on the same draws (which
    runs every network once, and whose statistics equal the hand-written reference's,
    test_benchmarks), one batch counted. Before, the likelihood network's layers moved
    twice per rws step."""
    truth = _statistics_after_one_step("iwae")
    found = _statistics_after_one_step(name)
    for key, value in truth.items():
        assert torch.equal(found[key], value), key
    counts = [v for k, v in found.items() if k.endswith("num_batches_tracked")]
    assert counts and all(int(c) == 1 for c in counts)


class _NormPair(torch.nn.Module):
    """A Gaussian pair whose decoder normalizes its hidden layer with ``norm`` (running
    statistics in training mode): instance norm, batch norm, or a TorchScript-compiled
    batch norm, which Python hooks cannot see inside."""

    def __init__(self, kind):
        super().__init__()
        self.dec_in, self.dec_out = torch.nn.Linear(2, 8), torch.nn.Linear(8, 3)
        self.enc = torch.nn.Linear(3, 4)
        self.kind = kind
        if kind == "instance":
            self.norm = torch.nn.InstanceNorm1d(2, track_running_stats=True)
        elif kind in ("batch", "worker"):
            self.norm = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(8))
        elif kind.startswith("custom"):
            layer = {
                "custom": _RunningCentre,
                "custom-count": _CountingCentre,
                "custom-numpy-count": functools.partial(_CountingCentre, start=np.int64(0)),
            }.get(kind, _FrozenParameterCentre)
            self.norm = torch.nn.Sequential(torch.nn.Flatten(), layer(8))
            self.plain = torch.nn.BatchNorm1d(3)
        else:
            scripted = {
                "scripted": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(8)),
                "scripted-subclass": torch.nn.Sequential(torch.nn.Flatten(), _OwnBatchNorm(8)),
                "scripted-no-statistics": torch.nn.InstanceNorm1d(2),
            }[kind]
            with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript
                warnings.simplefilter("ignore")
                self.norm = torch.jit.script(scripted)
            self.plain = torch.nn.BatchNorm1d(3)  # after it: still held, put back

    def _normalized(self, h):
        if self.kind != "worker":
            return self.norm(h)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # as DataParallel's replicas
            return pool.submit(self.norm, h).result()

    def model(self, x):
        pyro.module("norm_pair", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            h = self.dec_in(z)
            h = self._normalized(h.reshape(-1, 2, 4)).reshape(h.shape)
            out = self.dec_out(h.tanh())
            if hasattr(self, "plain"):
                out = self.plain(out.reshape(-1, 3)).reshape(out.shape)
            pyro.sample("x", dist.Normal(out, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("norm_pair", self)
        with pyro.plate("data", x.shape[0]):
            h = self.enc(x)
            scale = torch.nn.functional.softplus(h[..., 2:])
            pyro.sample("z", dist.Normal(h[..., :2], scale).to_event(1))


def _norm_statistics(name, kind):
    pyro.clear_param_store()
    torch.manual_seed(0)
    pair = _NormPair(kind)
    x = torch.randn(6, 3)
    torch.manual_seed(1)
    with warnings.catch_warnings():  # Pyro's: a parameter without gradient is not registered
        warnings.filterwarnings("ignore", ".*running_mean was not registered")
        make_elbo(name, 3, max_plate_nesting=1).loss_and_grads(pair.model, pair.guide, x)
    momenta = [m.momentum for m in pair.modules() if hasattr(m, "momentum")]
    assert momenta and all(m == 0.1 for m in momenta)
    statistics = {n: b.clone() for n, b in pair.named_buffers()}
    statistics.update((n, p.detach().clone()) for n, p in pair.named_parameters() if "running" in n)
    for name_, module in pair.named_modules():  # a count kept as a Python int
        if isinstance(count := module.__dict__.get("num_batches_tracked"), (int, np.integer)):
            statistics[f"{name_}.count"] = torch.tensor(count)
    return statistics


class _OwnBatchNorm(torch.nn.BatchNorm1d):
    """A user's batch norm class: under TorchScript it is known by its statistics only."""


class _RunningCentre(torch.nn.Module):
    """A user's own normalization layer, no torch class: it centres with the batch mean in
    training mode and keeps a running mean, which its forward updates in place."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(n))

    def forward(self, h):
        if not self.training:
            return h - self.running_mean
        mean = h.mean(0)
        with torch.no_grad():
            self.running_mean.mul_(0.9).add_(0.1 * mean)
        return h - mean


class _CountingCentre(torch.nn.Module):
    """A user's layer that keeps a cumulative running mean with a Python ``int`` count."""

    def __init__(self, n, start=0):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(n))
        self.num_batches_tracked = start  # an int, or a NumPy integer

    def forward(self, h):
        mean = h.mean(0)
        if self.training:
            self.num_batches_tracked += 1
            with torch.no_grad():
                self.running_mean.lerp_(mean, 1.0 / self.num_batches_tracked)
        return h - mean


class _FrozenParameterCentre(_RunningCentre):
    """A user's layer that keeps its running mean as a parameter that takes no gradient."""

    def __init__(self, n):
        torch.nn.Module.__init__(self)
        self.running_mean = torch.nn.Parameter(torch.zeros(n), requires_grad=False)


KINDS = [
    "instance",
    "batch",
    "worker",
    "custom",
    "custom-count",
    "custom-numpy-count",
    "custom-parameter",
    "scripted",
    "scripted-subclass",
    "scripted-no-statistics",
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["rws", "elbo-condkl-sg"])
def test_every_kind_of_norm_layer_moves_its_statistics_once(name, kind):
    """A user pair's instance norm, batch norm run in a worker thread, and TorchScript norm
    layers (a subclass; one without statistics, beside a plain batch norm) too: the
    statistics after one step are an iwae step's on the same draws (the model runs once
    there), and every layer's momentum is its own again."""
    truth, found = _norm_statistics("iwae", kind), _norm_statistics(name, kind)
    assert truth
    for key, value in truth.items():
        assert torch.equal(found[key], value), key


def _closure_pair(norm):
    """A plain-function pair whose networks live in closures (no module behind a bound
    method): the decoder's hidden layer goes through ``norm``."""
    torch.manual_seed(0)
    dec_in, dec_out, enc = torch.nn.Linear(2, 8), torch.nn.Linear(8, 3), torch.nn.Linear(3, 4)
    nets = torch.nn.ModuleDict({"dec_in": dec_in, "dec_out": dec_out, "enc": enc, "norm": norm})

    def model(x):
        pyro.module("closure_norm", nets)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            h = dec_in(z)
            h = norm(h.reshape(-1, 8)).reshape(h.shape)
            pyro.sample("x", dist.Normal(dec_out(h.tanh()), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("closure_norm", nets)
        with pyro.plate("data", x.shape[0]):
            h = enc(x)
            scale = torch.nn.functional.softplus(h[..., 2:])
            pyro.sample("z", dist.Normal(h[..., :2], scale).to_event(1))

    return model, guide, nets


@pytest.mark.parametrize("compiled", ["script", "trace"])
@pytest.mark.parametrize("name, options", [("piwae", {"outer": 1}), ("rws", {"shared": "theta"})])
def test_the_roles_pass_leaves_torchscript_statistics_in_closures_alone(compiled, name, options):
    """Estimators that find parameter roles by a dependence pass of their own (eval mode,
    its own random numbers): a TorchScript batch norm held in a closure runs its layers in
    training mode there (eval mode reaches only the outer compiled module), so before the
    pass moved its statistics once more per pair. Truth: two iwae calls on the same draws."""
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(5))

    def statistics(estimator, **opts):
        pyro.clear_param_store()
        seeded = torch.Generator().manual_seed(2)  # the trace's example batch
        with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript
            warnings.simplefilter("ignore")
            norm = torch.nn.Sequential(torch.nn.BatchNorm1d(8))
            norm = (
                torch.jit.script(norm)
                if compiled == "script"
                else torch.jit.trace(norm, torch.randn(18, 8, generator=seeded), check_trace=False)
            )
        model, guide, nets = _closure_pair(norm)
        start = int(dict(nets.named_buffers())["norm.0.num_batches_tracked"])  # a trace ran it
        elbo = make_elbo(estimator, 3, max_plate_nesting=1, **opts)
        torch.manual_seed(1)
        for _ in range(2):
            elbo.loss_and_grads(model, guide, x)
        return start, {n: b.clone() for n, b in nets.named_buffers()}

    (start, truth), (_, found) = statistics("iwae"), statistics(name, **options)
    assert int(truth["norm.0.num_batches_tracked"]) == start + 2
    for key, value in truth.items():
        assert torch.equal(found[key], value), key


def test_the_hold_is_the_steps_own_thread():
    """Batch norm that another thread runs while a step's fixed-sample pass holds the
    step's statistics moves as it would without the step (the hold is per thread)."""
    import threading

    from pyro_ladder._util import held_statistics

    other = torch.nn.BatchNorm1d(3)
    started, release = threading.Event(), threading.Event()

    def worker():
        started.wait()
        other(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)) + 5.0)
        release.set()

    thread = threading.Thread(target=worker)
    thread.start()
    with held_statistics():
        started.set()
        release.wait(timeout=30)
    thread.join()
    assert int(other.num_batches_tracked) == 1 and other.running_mean.min() > 0.4
    assert other.momentum == 0.1
