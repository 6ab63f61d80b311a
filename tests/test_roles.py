"""Parameter roles follow autograd dependence, never registration (issue 15.1).

One hand-written two-layer ladder pair (the guide's lower layer merges its encoder head
with the prior network ``p(z1 | z2)``, which the model uses too) in four registration
styles; every estimator must give the same loss and gradients in all four.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from pyro_ladder import ESTIMATORS, make_elbo
from pyro_ladder._traces import parameter_roles
from pyro_ladder.merge import precision_weighted

X_DIM, Z2, Z1, H = 4, 2, 3, 5
NETS = {
    "enc": (X_DIM, H),
    "head2": (H, 2 * Z2),
    "head1": (H, 2 * Z1),
    "prior": (Z2, 2 * Z1),
    "dec": (Z1, X_DIM),
}
ROLE = {"enc": "guide", "head2": "guide", "head1": "guide", "prior": "shared", "dec": "model"}


def _weights():
    """One set of float64 weights ``{"enc.weight": tensor, ...}`` for every style."""
    g = torch.Generator().manual_seed(7)
    return {
        f"{net}.{kind}": torch.randn(
            *(shape[::-1] if kind == "weight" else shape[1:]), generator=g, dtype=torch.float64
        )
        * 0.7
        for net, shape in NETS.items()
        for kind in ("weight", "bias")
    }


def _gauss(out):
    loc, raw = out.chunk(2, -1)
    return loc, F.softplus(raw) + 1e-2


def _model(x, p):
    """``p(name) -> tensor``: the weight or bias by canonical name."""
    with pyro.plate("data", x.shape[0]):
        z2 = pyro.sample("z2", dist.Normal(x.new_zeros(Z2), 1.0).to_event(1))
        loc, scale = _gauss(F.linear(z2, p("prior.weight"), p("prior.bias")))
        z1 = pyro.sample("z1", dist.Normal(loc, scale).to_event(1))
        logits = F.linear(z1, p("dec.weight"), p("dec.bias"))
        pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def _guide(x, p):
    h = torch.tanh(F.linear(x, p("enc.weight"), p("enc.bias")))
    with pyro.plate("data", x.shape[0]):
        z2 = pyro.sample(
            "z2", dist.Normal(*_gauss(F.linear(h, p("head2.weight"), p("head2.bias")))).to_event(1)
        )
        prior = _gauss(F.linear(z2, p("prior.weight"), p("prior.bias")))
        up = _gauss(F.linear(h, p("head1.weight"), p("head1.bias")))
        pyro.sample("z1", dist.Normal(*precision_weighted(*prior, *up)).to_event(1))


class _Nets(nn.Module):
    def __init__(self, linear=nn.Linear):
        super().__init__()
        for net, shape in NETS.items():
            setattr(self, net, linear(*shape).double())
        with torch.no_grad():
            for name, value in _weights().items():
                self.get_parameter(name).copy_(value)

    def p(self, name):
        net, kind = name.split(".")
        return getattr(getattr(self, net), kind)


class PerNetwork(_Nets):
    """``pyro.module`` per network, where it is used."""

    def model(self, x):
        for net in ("prior", "dec"):
            pyro.module(f"pn_{net}", getattr(self, net))
        _model(x, self.p)

    def guide(self, x):
        for net in ("enc", "head2", "head1", "prior"):
            pyro.module(f"pn_{net}", getattr(self, net))
        _guide(x, self.p)

    def grads(self):
        return {n: p.grad for n, p in self.named_parameters()}


class WholeModule(PerNetwork):
    """``pyro.module("pair", self)`` in both the model and the guide (issue 15's case)."""

    def model(self, x):
        pyro.module("pair", self)
        _model(x, self.p)

    def guide(self, x):
        pyro.module("pair", self)
        _guide(x, self.p)


class TwiceRegistered(PerNetwork):
    """The whole module *and* each network: every tensor under two names."""

    def model(self, x):
        pyro.module("twice", self)
        super().model(x)

    def guide(self, x):
        pyro.module("twice", self)
        super().guide(x)


class AsPyroModule(PyroModule):
    """A ``PyroModule``: parameters registered on attribute access."""

    def __init__(self):
        super().__init__()
        for net, shape in NETS.items():
            setattr(self, net, PyroModule[nn.Linear](*shape).double())
        with torch.no_grad():
            for name, value in _weights().items():
                net, kind = name.split(".")
                getattr(getattr(self, net), kind).copy_(value)

    def p(self, name):
        net, kind = name.split(".")
        return getattr(getattr(self, net), kind)

    def forward(self, x, which):  # parameters reach Pyro inside a PyroModule's call
        (_model if which == "model" else _guide)(x, self.p)

    def model(self, x):
        self(x, "model")

    def guide(self, x):
        self(x, "guide")

    def grads(self):
        store = dict(pyro.get_param_store().named_parameters())
        return {n: store[n].grad for n in _weights()}


class ParamStore:
    """``pyro.param`` directly, functions without modules."""

    def __init__(self):
        for name, value in _weights().items():
            pyro.param(f"ps.{name}", value.clone())

    @staticmethod
    def p(name):
        return pyro.param(f"ps.{name}")

    def model(self, x):
        _model(x, self.p)

    def guide(self, x):
        _guide(x, self.p)

    def grads(self):
        store = dict(pyro.get_param_store().named_parameters())
        return {n: store[f"ps.{n}"].grad for n in _weights()}


class PartlyRegistered(PerNetwork):
    """Only the model registers its networks; the guide runs its own (encoder and heads)
    without telling Pyro, as a loop that calls ``backward`` itself may (Lightning)."""

    def guide(self, x):
        _guide(x, self.p)


STYLES = [PerNetwork, WholeModule, AsPyroModule, ParamStore, TwiceRegistered]
# the gradients are the same whatever is registered with Pyro (the roles come from
# dependence: the split estimators once gave unregistered networks no gradient at all)
# (a pair that registers nothing at all gets none from Pyro's own Trace_ELBO: it calls
# backward only when a trace holds a param site)
GRADIENT_STYLES = [*STYLES, PartlyRegistered]
OPTIONS = {
    "renyi": {"alpha": 0.5},
    "miwae": {"outer": 2},
    "piwae": {"outer": 2},
    "miwae-dreg": {"outer": 2},
    "piwae-dreg": {"outer": 2},
    "ciwae": {"beta": 0.3},
}


@pytest.fixture
def x():
    torch.manual_seed(5)
    return torch.rand(3, X_DIM, dtype=torch.float64).round()


def _run(style, name, x, num_particles=4, seed=3, **options):
    pyro.clear_param_store()
    pair = style()
    elbo = make_elbo(name, num_particles, max_plate_nesting=1, **OPTIONS.get(name, {}), **options)
    pyro.set_rng_seed(seed)
    loss = elbo.loss_and_grads(pair.model, pair.guide, x)
    grads = pair.grads()
    return loss, {
        n: torch.zeros_like(w) if grads[n] is None else grads[n].clone()
        for n, w in _weights().items()
    }


def test_roles_are_the_same_in_every_style(x):
    for style in STYLES:
        pyro.clear_param_store()
        pair = style()
        guide_only, model, shared = parameter_roles(pair.model, pair.guide, (x,), {})
        store = dict(pyro.get_param_store().named_parameters())
        by_id = {id(t): n for n, t in store.items()}
        found = {}
        for role, group in (("guide", guide_only), ("model", model), ("shared", shared)):
            for tensor in group.values():
                parts = by_id[id(tensor)].replace("$$$", ".").split(".")
                net = next(p for p in parts if p not in ("pair", "twice", "ps"))
                found.setdefault(net.removeprefix("pn_"), set()).add(role)
        expected = {net: {"model", "shared"} if r == "shared" else {r} for net, r in ROLE.items()}
        assert found == expected, style.__name__


NAMES = sorted(n for n in ESTIMATORS if not n.startswith("jit-"))


CASES = [(n, {}) for n in NAMES] + [
    ("iwae-dreg", {"shared": "dreg"}),
    ("miwae-dreg", {"shared": "dreg"}),
    ("rws", {"shared": "theta"}),
    ("rws-dreg", {"shared": "theta"}),
]


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}{o or ''}" for n, o in CASES])
def test_every_estimator_gives_the_same_gradients_in_every_registration_style(name, options, x):
    ref_loss, ref = _run(PerNetwork, name, x, **options)
    assert any(g.abs().sum() > 0 for n, g in ref.items() if n.startswith("enc"))
    for style in GRADIENT_STYLES[1:]:
        loss, grads = _run(style, name, x, **options)
        assert loss == pytest.approx(ref_loss, rel=1e-12), style.__name__
        for n, g in grads.items():
            torch.testing.assert_close(g, ref[n], rtol=1e-9, atol=1e-12, msg=f"{style} {n}")


def test_whole_module_registration_gets_the_dreg_guide_gradient(x):
    """The issue's case: before, the encoder of a pair registered whole in both got IWAE's
    gradient from ``iwae-dreg``; now it gets DReG's, and the decoder keeps IWAE's."""
    _, dreg = _run(WholeModule, "iwae-dreg", x)
    _, full = _run(WholeModule, "iwae-dreg", x, shared="dreg")
    _, iwae = _run(WholeModule, "iwae", x)
    for n in dreg:
        net = n.split(".")[0]
        if ROLE[net] == "guide":  # DReG's term, which differs from IWAE's
            torch.testing.assert_close(dreg[n], full[n], rtol=1e-9, atol=1e-12)
            assert not torch.allclose(dreg[n], iwae[n])
        else:  # the model's parameters, shared ones included: plain IWAE
            torch.testing.assert_close(dreg[n], iwae[n], rtol=1e-9, atol=1e-12)


def test_roles_found_under_no_grad_are_the_same(x):
    pair = WholeModule()
    with torch.no_grad():  # as in a check before training; the answer is cached for later
        quiet = parameter_roles(pair.model, pair.guide, (x,), {})
    assert [len(group) for group in quiet] == [6, 4, 2]  # enc + 2 heads; prior + dec; prior
    with torch.no_grad():
        again = parameter_roles(pair.model, pair.guide, (x,), {})
    assert again is quiet


def test_roles_are_cached_per_pair_and_parameter_set_and_leave_the_rng_alone(x, monkeypatch):
    import pyro_ladder._traces as traces

    calls = []
    real = traces._roles_by_dependence
    monkeypatch.setattr(traces, "_roles_by_dependence", lambda *a: calls.append(1) or real(*a))
    pair = WholeModule()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = parameter_roles(pair.model, pair.guide, (x,), {})
    assert torch.equal(torch.rand(3), expected)  # the pass draws its own random numbers
    assert parameter_roles(pair.model, pair.guide, (x,), {}) is first
    assert len(calls) == 1
    pair.dec.bias.requires_grad_(False)  # the parameter set changed: found again
    second = parameter_roles(pair.model, pair.guide, (x,), {})
    assert len(calls) == 2 and all(t is not pair.dec.bias for t in second.model.values())
    pyro.clear_param_store()
    other = WholeModule()  # a new instance, new tensors: never the old answer
    third = parameter_roles(other.model, other.guide, (x,), {})
    assert len(calls) == 3
    assert {id(t) for t in third.model.values()} <= {id(p) for p in other.parameters()}


class _SwappedDecoder(PerNetwork):
    """Every network registered but the decoder, which the model runs without telling Pyro
    (and which the test replaces between calls)."""

    def model(self, x):
        pyro.module("pn_prior", self.prior)
        _model(x, self.p)


SPLIT = [("iwae-dreg", {}), ("piwae", {}), ("rws", {"shared": "theta"})]


@pytest.mark.parametrize("name, options", SPLIT, ids=[n for n, _ in SPLIT])
def test_an_unregistered_network_replaced_between_calls_gets_its_gradient(name, options, x):
    """Roles that hold unregistered tensors are not cached (the cache's key names the
    registered ones only): before, the new decoder got no gradient at all. Truth: the same
    draws with every network registered and the new decoder's weights."""
    pyro.clear_param_store()
    pair = _SwappedDecoder()
    elbo = make_elbo(name, 4, max_plate_nesting=1, **OPTIONS.get(name, {}), **options)
    pyro.set_rng_seed(3)
    elbo.loss_and_grads(pair.model, pair.guide, x)
    new = nn.Linear(*NETS["dec"]).double()
    pair.dec = new
    pair.zero_grad(set_to_none=True)
    pyro.set_rng_seed(4)
    loss = elbo.loss_and_grads(pair.model, pair.guide, x)
    grads = pair.grads()

    pyro.clear_param_store()
    truth = PerNetwork()
    truth.dec.load_state_dict(new.state_dict())
    truth_elbo = make_elbo(name, 4, max_plate_nesting=1, **OPTIONS.get(name, {}), **options)
    pyro.set_rng_seed(4)
    assert loss == pytest.approx(truth_elbo.loss_and_grads(truth.model, truth.guide, x), rel=1e-12)
    for n, g in truth.grads().items():
        assert grads[n] is not None, n
        torch.testing.assert_close(grads[n], g, rtol=1e-9, atol=1e-12, msg=n)


def test_data_that_requires_grad_gets_its_gradient_on_every_batch():
    """Data that requires grad is a tensor the pair does not register, new at every batch:
    iwae-dreg gives it its role (used by both sides: the model's coefficients, IWAE's
    gradient) on every batch. Before, the roles cached at the first batch held that
    batch's tensor and the later ones got no gradient. Truth: iwae on the same draws."""
    torch.manual_seed(5)
    batches = [torch.rand(3, X_DIM, dtype=torch.float64).round() for _ in range(3)]
    pyro.clear_param_store()
    pair = PerNetwork()
    dreg = make_elbo("iwae-dreg", 4, max_plate_nesting=1)
    iwae = make_elbo("iwae", 4, max_plate_nesting=1)
    for i, batch in enumerate(batches):
        tested, truth = batch.clone().requires_grad_(), batch.clone().requires_grad_()
        pyro.set_rng_seed(i)
        dreg.loss_and_grads(pair.model, pair.guide, tested)
        pyro.set_rng_seed(i)
        iwae.loss_and_grads(pair.model, pair.guide, truth)
        assert tested.grad is not None and truth.grad.abs().sum() > 0, i
        torch.testing.assert_close(tested.grad, truth.grad, rtol=1e-9, atol=1e-12)
