"""Property-based tests (hypothesis): the merge, the heads, the log-likelihood estimator, the
data loaders on malformed files and the command line on random option values."""

import gzip
import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_ladder import DataError, GaussianHead, evaluate, precision_weighted
from pyro_ladder.cli import main
from pyro_ladder.data import read_amat
from pyro_ladder.likelihoods import BernoulliLikelihood

evaluate_module = importlib.import_module("pyro_ladder.evaluate")  # the package's
# `evaluate` attribute is the function of that name, so import the module by its path
SCALES = st.floats(1e-8, 1e8)
LOCS = st.floats(-1e3, 1e3)
FAST = settings(max_examples=60, deadline=None)


@FAST
@given(LOCS, SCALES, LOCS, SCALES)
def test_merge_is_symmetric_adds_precisions_and_lies_between(loc_p, scale_p, loc_q, scale_q):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loc, scale = precision_weighted(t(loc_p), t(scale_p), t(loc_q), t(scale_q))
    loc2, scale2 = precision_weighted(t(loc_q), t(scale_q), t(loc_p), t(scale_p))
    assert torch.equal(scale, scale2)
    assert math.isclose(loc, loc2, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(scale**-2, scale_p**-2 + scale_q**-2, rel_tol=1e-9)
    assert min(loc_p, loc_q) - 1e-9 <= loc <= max(loc_p, loc_q) + 1e-9
    assert scale <= min(scale_p, scale_q) * (1 + 1e-12)  # rounding of the last bit


@FAST
@given(LOCS, SCALES, LOCS, SCALES)
def test_merge_stays_finite_in_float32(loc_p, scale_p, loc_q, scale_q):
    t = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
    loc, scale = precision_weighted(t(loc_p), t(scale_p), t(loc_q), t(scale_q))
    assert torch.isfinite(loc).all() and torch.isfinite(scale).all() and (scale > 0).all()


@FAST
@given(st.floats(-1e8, 1e8), st.integers(0, 2**16))
def test_gaussian_head_gives_finite_positive_scales_for_extreme_inputs(value, seed):
    torch.manual_seed(seed)
    head = GaussianHead(4, 3)
    loc, scale = head(torch.full((2, 4), value))
    assert torch.isfinite(loc).all() and torch.isfinite(scale).all()
    assert (scale >= head.var_floor**0.5).all()


@FAST
@given(st.floats(-1e30, 1e30), st.sampled_from([0.0, 1.0]))
def test_bernoulli_log_prob_is_finite_for_extreme_logits(logit, pixel):
    likelihood = BernoulliLikelihood(2, 4, 3, batch_norm=False)
    with torch.no_grad():
        likelihood.logits.weight.zero_()
        likelihood.logits.bias.fill_(logit)
    log_p = likelihood(torch.zeros(1, 2)).log_prob(torch.full((1, 3), pixel))
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()


# The estimator. Its streaming reduction sees log-weights chunk by chunk; feed it a fixed
# table, in random sample order and chunk sizes, and compare with the whole-table formulas.


def _fake_log_weights(table, orders):
    """Serve ``table (K, N)`` rows for the data points whose ids ``x[:, 0]`` holds."""
    served = {}

    def log_weights(batch, S):
        ids = batch.x[:, 0].long()
        rows = []
        for i in ids.tolist():
            start = served.get(i, 0)
            rows.append(table[orders[i][start : start + S], i])
            served[i] = start + S
        log_w = torch.stack(rows, 1)  # (S, B)
        return log_w, {"kl:z": -log_w}

    return log_weights


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.integers(1, 40),
    st.integers(1, 6),
    st.integers(1, 8),
    st.integers(1, 64),
    st.floats(0.01, 30.0),
    st.randoms(use_true_random=False),
)
def test_log_likelihood_ignores_sample_and_data_order_and_bounds_the_elbo(
    monkeypatch, K, N, batch_size, max_rows, spread, rnd
):
    gen = torch.Generator().manual_seed(rnd.randint(0, 2**31))
    table = torch.randn(K, N, generator=gen, dtype=torch.float64) * spread  # log w
    orders = [torch.randperm(K, generator=gen) for _ in range(N)]
    monkeypatch.setattr(evaluate_module, "_log_weights", _fake_log_weights(table, orders))
    monkeypatch.setattr(evaluate_module, "max_plate_nesting", lambda *a, **k: 1)
    perm = torch.randperm(N, generator=gen)
    x = perm.to(torch.float64)[:, None]  # data point i is row perm[i] of the table
    nothing = lambda *a, **k: None  # noqa: E731  (_log_weights is faked)
    result = evaluate(nothing, nothing, x, num_samples=K, batch_size=batch_size, max_rows=max_rows)
    expected = table[:, perm].logsumexp(0) - math.log(K)
    torch.testing.assert_close(result["log_likelihood"], expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(result["elbo"], table[:, perm].mean(0), rtol=0, atol=1e-9)
    assert (result["log_likelihood"] >= result["elbo"] - 1e-9).all()
    assert ((result["ess"] >= 1 - 1e-9) & (result["ess"] <= K + 1e-9)).all()


# Data loaders: any text either parses into a binary matrix or is refused with DataError.

TOKENS = st.sampled_from(["0", "1", "0.0", "1e0", "2", "-1", "nan", "inf", "x", "", " ", "\t"])


@FAST
@given(st.lists(st.lists(TOKENS, max_size=6), max_size=6), st.booleans())
def test_read_amat_parses_or_refuses_random_files(tmp_path_factory, rows, compressed):
    text = "\n".join(" ".join(row) for row in rows).encode()
    folder = tmp_path_factory.mktemp("amat")
    path = folder / ("random.amat.gz" if compressed else "random.amat")
    path.write_bytes(gzip.compress(text) if compressed else text)
    try:
        x = read_amat(path)
    except DataError as err:
        assert "\n" not in str(err) and str(path) in str(err)
        return
    assert x.dim() == 2 and x.shape[0] >= 1
    assert set(np.unique(x.numpy())) <= {0.0, 1.0}


@FAST
@given(st.binary(max_size=300))
def test_read_amat_refuses_random_bytes_cleanly(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("amat") / "blob.amat.gz"
    path.write_bytes(blob)
    with pytest.raises(DataError):
        read_amat(path)


# The command line: random option values end in a result or in one line and exit status 2.


class _Stop(Exception):
    """Raised in place of training: the options got through every check."""


OPTION_VALUES = st.one_of(
    st.integers(-3, 5).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text("0123456789,.-e x", max_size=8),
)
OPTIONS = ["--epochs", "--batch-size", "--lr", "--latent-dims", "--hidden-dims", "--particles",
           "--warmup-epochs", "--eval-samples", "--eval-limit", "--checkpoint-every"]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(OPTIONS), OPTION_VALUES, min_size=1, max_size=4),
       st.sampled_from(["elbo", "iwae", "nope", ""]))
def test_cli_random_option_values_give_one_clear_line(tmp_path_factory, capsys, monkeypatch,
                                                      options, elbo):
    import pyro_ladder.runs.training as training

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(training, "fit", stop)
    capsys.readouterr()  # capsys spans every example: drop what an earlier one printed
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--out", str(out), "--no-progress", "--elbo", elbo]
    for key, value in options.items():
        argv += [f"{key}={value}"]
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse refused a value
        assert exit_.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pyro-ladder train: error:")
        assert list(out.iterdir()) == []
        return
    except _Stop:
        return
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyro-ladder: error:")
    assert list(out.iterdir()) == []
