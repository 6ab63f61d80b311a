"""No answer from an earlier call (issue 19): every write a user can make between two calls
is seen, because network outputs are reused only inside one estimator call.

The model is a one-layer Gaussian ladder trained briefly on data whose latent matters, so
an encoder answering for the wrong input (or old weights) would be off by many nats.
Each answer is compared with the same call, same seed, on a fresh tensor.
"""

import copy

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_ladder import LadderVAE, evaluate, make_elbo
from pyro_ladder.condition import pack
from pyro_ladder.diagnostics import kl_per_unit

CLASSES = 3


def _data(n, conditional, seed):
    """x = A z (+ a class offset) + noise, z ~ N(0, I_2): the latent carries most of x."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)) * 3
    x = torch.randn(n, 2, generator=g) @ a + 0.1 * torch.randn(n, 8, generator=g)
    if not conditional:
        return x
    labels = torch.randint(CLASSES, (n,), generator=g)
    return pack(x + labels[:, None].float(), labels, CLASSES)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "conditional"])
def trained(request):
    conditional = request.param
    pyro.set_rng_seed(0)
    vae = LadderVAE(
        8,
        (2,),
        (32,),
        likelihood="gaussian",
        batch_norm=False,
        condition_dim=CLASSES if conditional else 0,
    )
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), make_elbo("elbo"))
    data = _data(512, conditional, seed=1)
    for step in range(300):
        svi.step(data[(step % 8) * 64 : (step % 8 + 1) * 64])
    return vae, _data(20, conditional, seed=2), _data(20, conditional, seed=3)


def _logp(vae, x):
    pyro.set_rng_seed(7)
    return evaluate(vae.model, vae.guide, x, num_samples=20)["log_likelihood"]


def _recon(vae, x):
    pyro.set_rng_seed(7)
    return vae.reconstruct(x)


def test_the_encoder_matters(trained):
    """The premise: scoring x2 with x1's encodings (what a stale reuse would do) is off
    by many nats."""
    vae, x1, x2 = trained
    pyro.set_rng_seed(7)
    stale = evaluate(vae.model, lambda x: vae.guide(x1), x2, num_samples=20)["log_likelihood"]
    assert (stale - _logp(vae, x2)).abs().mean() > 5


def test_evaluate_in_inference_mode_on_a_refilled_buffer(trained):
    vae, x1, x2 = trained
    with torch.inference_mode():
        buf = x1.clone()
        _logp(vae, buf)
        buf.copy_(x2)
        refilled = _logp(vae, buf)
    torch.testing.assert_close(refilled, _logp(vae, x2.clone()), rtol=0, atol=0)


def test_reconstruct_of_a_refilled_buffer(trained):
    vae, x1, x2 = trained
    buf = x1.clone()
    _recon(vae, buf)
    buf.copy_(x2)
    torch.testing.assert_close(_recon(vae, buf), _recon(vae, x2.clone()), rtol=0, atol=0)
    with torch.inference_mode():
        buf = x1.clone()
        _recon(vae, buf)
        buf.copy_(x2)
        refilled = _recon(vae, buf)
    torch.testing.assert_close(refilled, _recon(vae, x2.clone()), rtol=0, atol=0)


def test_a_refilled_numpy_array_seen_through_from_numpy(trained):
    vae, x1, x2 = trained
    array = x1.numpy().copy()
    view = torch.from_numpy(array)
    _logp(vae, view)
    array[:] = x2.numpy()  # numpy writes bump no torch version counter
    torch.testing.assert_close(_logp(vae, view), _logp(vae, x2.clone()), rtol=0, atol=0)


@pytest.mark.parametrize("how", [".data", "load_state_dict", "new parameter"])
def test_encoder_weights_changed_between_calls(trained, how):
    vae, x1, _ = trained
    vae = copy.deepcopy(vae)
    other = LadderVAE.from_config(vae.config)
    other.generative.load_state_dict(vae.generative.state_dict())  # another encoder only
    before = _logp(vae, x1)
    if how == ".data":  # as EMA and Polyak-averaging code do
        for p, q in zip(vae.inference.parameters(), other.inference.parameters(), strict=True):
            p.data.copy_(q.data)
    elif how == "load_state_dict":
        vae.inference.load_state_dict(other.inference.state_dict())
    else:
        layer = vae.inference.blocks[0].net[0]
        layer.weight = torch.nn.Parameter(other.inference.blocks[0].net[0].weight.clone())
    after = _logp(vae, x1)
    assert (after - before).abs().mean() > 1  # the edit matters
    torch.testing.assert_close(after, _logp(vae, x1.clone()), rtol=0, atol=0)


def test_kl_per_unit_on_a_refilled_buffer(trained):
    vae, x1, x2 = trained

    def kl(x):
        pyro.set_rng_seed(7)
        return kl_per_unit(vae.model, vae.guide, x)["z1"]

    buf = x1.clone()
    kl(buf)
    buf.copy_(x2)
    torch.testing.assert_close(kl(buf), kl(x2.clone()), rtol=0, atol=0)


def test_sample_follows_prior_weights_changed_through_data():
    pyro.set_rng_seed(0)
    vae = LadderVAE(8, (3, 2), (16, 16), likelihood="gaussian", batch_norm=False)

    def sample(v):
        pyro.set_rng_seed(7)
        return v.sample(5)

    first = sample(vae)
    for p in vae.generative.priors.parameters():
        p.data.mul_(3.0)
    second = sample(vae)
    assert (second - first).abs().max() > 1e-3
    torch.testing.assert_close(second, sample(copy.deepcopy(vae)), rtol=0, atol=0)


def test_no_reuse_outside_an_estimator_call():
    """Pyro's own Trace_ELBO on vae.model / vae.guide: the model runs the prior networks
    itself (nothing is handed over outside our estimators)."""
    pyro.set_rng_seed(0)
    vae = LadderVAE(6, (3, 2), (8, 8), batch_norm=False)
    calls = []
    vae.generative.priors[0].register_forward_hook(lambda *_: calls.append(1))
    pyro.infer.Trace_ELBO().loss(vae.model, vae.guide, torch.rand(4, 6).round())
    assert len(calls) == 2
    calls.clear()
    make_elbo("elbo").loss(vae.model, vae.guide, torch.rand(4, 6).round())
    assert len(calls) == 1
