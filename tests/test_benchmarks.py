"""The benchmark compares like with like: the plain-PyTorch reference computes the library's
function (same weights, same draws, same losses and gradients), and the runner runs."""

import json
import math

import pyro
import pytest
import torch
from pyro.infer import SVI

from benchmarks import run, table
from benchmarks.reference import ReferenceLadder
from pyro_ladder import ConfigError, LadderVAE, evaluate, make_elbo


def _pair(dtype=torch.float64, bernoulli="torch", **kwargs):
    torch.manual_seed(2)
    sizes = dict(x_dim=12, latent_dims=(5, 4, 3), hidden_dims=(16, 10, 8))
    vae = LadderVAE(**{**sizes, **kwargs}).to(dtype)
    return vae, ReferenceLadder.from_library(vae, bernoulli)


def _x(n=9, d=12, dtype=torch.float64):
    torch.manual_seed(3)
    return (torch.rand(n, d) < 0.4).to(dtype)


def _library(vae, x, name, k):
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(7)
    loss = make_elbo(name, k, max_plate_nesting=1).loss_and_grads(vae.model, vae.guide, x)
    return loss, {n: p.grad for n, p in vae.named_parameters()}


def _reference(ref, x, name, k):
    ref.zero_grad(set_to_none=True)
    pyro.set_rng_seed(7)
    loss = ref.backward(x, name, k)
    return loss, {n: p.grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("name, k", [("elbo", 1), ("iwae", 5), ("iwae-dreg", 5)])
@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("bernoulli", ["torch", "library"])  # whose Bernoulli log-density
def test_reference_has_the_library_loss_and_gradients(name, k, batch_norm, bernoulli):
    vae, ref = _pair(batch_norm=batch_norm, bernoulli=bernoulli)
    x = _x()
    if name == "iwae-dreg" and batch_norm:  # coupled particles: the library refuses
        with pytest.raises(ConfigError, match="training mode"):
            _library(vae, x, name, k)
        return
    loss, grads = _library(vae, x, name, k)
    ref_loss, ref_grads = _reference(ref, x, name, k)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert grads.keys() == ref_grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[key], rtol=1e-9, atol=1e-11, msg=key)


def test_dreg_differs_from_iwae_for_the_inference_network_only():
    """The reference's DReG is not IWAE in disguise: same generative gradient, other
    inference gradient (so the equality above tests the DReG path itself). Without batch
    norm, which would zero the gradient of the biases in front of it."""
    vae, ref = _pair(batch_norm=False)
    x = _x()
    _, iwae = _reference(ref, x, "iwae", 5)
    _, dreg = _reference(ref, x, "iwae-dreg", 5)
    for key in iwae:
        same = torch.allclose(iwae[key], dreg[key], rtol=1e-9, atol=1e-12)
        assert same == key.startswith("generative."), key


def test_reference_training_step_keeps_the_library_weights_in_step():
    """Three SVI steps with pyro.optim.Adam against three torch Adam steps: same weights."""
    vae, ref = _pair(batch_norm=True)
    x = _x()
    elbo = make_elbo("iwae", 3, max_plate_nesting=1)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for step in range(3):
        pyro.set_rng_seed(step)
        loss = svi.step(x)
        pyro.set_rng_seed(step)
        ref_loss = ref.train_step(opt, x, "iwae", 3)
        assert loss == pytest.approx(ref_loss, rel=1e-10)
    # batch-norm statistics included (a second update per step would move them by ~1e-2);
    # the biases in front of batch norm have a gradient of pure rounding noise, which Adam
    # scales up to ~1e-9 differences, hence the tolerance
    for key, value in vae.state_dict().items():
        torch.testing.assert_close(value, ref.state_dict()[key], rtol=1e-7, atol=1e-7, msg=key)


@pytest.mark.parametrize("bernoulli", ["torch", "library"])
def test_reference_log_likelihood_equals_evaluate_on_the_same_draws(bernoulli):
    vae, ref = _pair(batch_norm=True, bernoulli=bernoulli)
    x = _x(n=6)
    pyro.set_rng_seed(11)
    lib = evaluate(vae.model, vae.guide, x, num_samples=40, batch_size=6, max_rows=60)
    pyro.set_rng_seed(11)
    ref.eval()  # evaluate's plate probe leaves the random state as it was: no draws to skip
    ours = ref.log_likelihood(x, 40, batch_size=6, max_rows=60)  # chunks of 10 draws alike
    torch.testing.assert_close(lib["log_likelihood"], ours, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(ours).all() and (ours < 0).all()


def test_reference_refuses_what_it_does_not_implement():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="top-down Bernoulli"):
        ReferenceLadder.from_library(LadderVAE(6, (2,), (4,), inference="bottom-up"))
    with pytest.raises(ValueError, match="bernoulli must be one of"):
        ReferenceLadder.from_library(LadderVAE(6, (2,), (4,)), bernoulli="fast")


def test_runner_records_the_references_bernoulli(tmp_path):
    out = tmp_path / "bench.json"
    run.main(["--tiny", "--only", "eval", "--reference-bernoulli", "library", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["conditions"]["reference_bernoulli"] == "library"
    assert saved["eval"]["reference_s"] > 0 and saved["eval"]["reference_peak_rss_mb"] > 0
    assert run.REFERENCE_BERNOULLI == "library"
    run.main(["--tiny", "--only", "eval", "--out", str(out)])  # the default again
    assert json.loads(out.read_text())["conditions"]["reference_bernoulli"] == "torch"


def test_runner_tiny_writes_every_part(tmp_path):
    out = tmp_path / "bench.json"
    results = run.main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["conditions"]["threads"] == 1 and len(saved["conditions"]["load_average_end"]) == 3
    steps = [r for r in saved["train"] if "kind" not in r]
    assert [r["estimator"] for r in steps] == ["elbo", "iwae", "iwae-dreg", "jit-elbo"]
    fixed = [r["estimator"] for r in saved["train"] if r.get("kind") == "fixed cost"]
    assert fixed == ["elbo", "iwae", "iwae-dreg"]
    timings = [r[c] for r in saved["train"] for c in ("library_ms", "reference_ms", "ratio")]
    assert all(math.isfinite(t) and t > 0 for t in timings)
    ev = saved["eval"]
    assert ev["library_peak_rss_mb"] > 0 and ev["library_images_per_s"] > 0
    scaling = saved["scaling"]
    assert [r["particles"] for r in scaling["step_vs_k"]] == [1, 2, 1, 2]
    assert [r["depth"] for r in scaling["step_vs_depth"]] == [1, 2]
    assert scaling["memory_vs_images"][0]["library_peak_rss_mb"] > 0
    assert {t["what"] for t in results["targets"]} >= {"elbo step (K=1)", "eval K=20 time"}
    c = saved["conditions"]
    assert c["device"] == "cpu" and c["torch"]
    assert c["cpu_name"] and c["cpu_capability"] and c["gemm_gflops"] > 0  # which CPU, how fast
    # the page's table is made from this JSON by one command, between its markers
    page = tmp_path / "performance.md"
    page.write_text(
        f"# Performance\n\nbefore\n{table.START}\nOLD-TABLE-CONTENT\n{table.END}\nafter\n"
    )
    table.main([str(out), "--write", str(page)])
    text = page.read_text()
    assert "OLD-TABLE-CONTENT" not in text and text.startswith("# Performance\n\nbefore\n")
    assert text.endswith(f"{table.END}\nafter\n")
    first = steps[0]
    assert f"| training step, `elbo` | {first['library_ms']:.1f} ms | " in text
    assert "1 torch thread(s)" in text and "load average" in text
    assert f"{c['cpu_name']} with {c['cpu_capability']}, " in text and " GFLOP/s in float32" in text


@pytest.mark.slow
def test_runner_compiled_part_runs(tmp_path):
    """The compiled part on the tiny network with the cheapest backend (about a minute)."""
    out = tmp_path / "compiled.json"
    run.main(["--tiny", "--only", "compiled", "--compile-backend", "eager", "--out", str(out)])
    rows = json.loads(out.read_text())["compiled"]
    assert [r["estimator"] for r in rows] == ["elbo", "iwae", "iwae-dreg"]
    assert all(r["reference_compiled_ms"] > 0 and r["library_compile_s"] > -1 for r in rows)


def test_runner_refuses_a_cuda_device_it_does_not_have():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "cuda"])


def test_runner_rejects_unknown_parts():
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "train,warp"])


def test_bernoulli_benchmark_runs_and_compares_like_shapes(tmp_path):
    from benchmarks import bernoulli

    out = tmp_path / "bernoulli.json"
    result = bernoulli.main(["--repeats", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["what"] for r in rows] == [*bernoulli.SHAPES, "elementwise, evaluation chunk"]
    for row in rows[:-1]:
        for key in ("forward", "forward_backward"):
            assert row[f"torch_{key}_ms"] > 0 and row[f"library_{key}_ms"] > 0
    assert result["threads"] == 1 and rows[-1]["log1p"] > 0


@pytest.mark.parametrize("name,k", [("elbo", 1), ("iwae", 3)])
def test_floor_records_every_matrix_product_of_the_step(name, k):
    """The floor's recording against a count of its own: forward hooks on every ``Linear``
    of the reference see each call's rows; each call is one product forward, one for the
    weight's gradient and one for the input's, unless the input (the data) takes none.
    The recorded products' floating-point operations must equal that sum."""
    from benchmarks import floor

    _, ref = _pair(dtype=torch.float32)
    x = _x(d=12, dtype=torch.float32)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    ref.train_step(opt, x, name, k)
    expected = []

    def hook(module, inputs, output):
        h = inputs[0]
        rows = h.numel() // h.shape[-1]
        per_product = 2 * rows * module.in_features * module.out_features
        expected.append(per_product * (3 if h.requires_grad else 2))

    handles = [
        m.register_forward_hook(hook) for m in ref.modules() if isinstance(m, torch.nn.Linear)
    ]
    try:
        with floor._Products() as recorder:
            ref.train_step(opt, x, name, k)
    finally:
        for handle in handles:
            handle.remove()
    recorded = sum(floor._flops(func, spec) for func, spec, _ in recorder.calls)
    assert len(expected) > 10 and recorded == sum(expected)
    products = floor._replay(recorder.calls)
    products()  # the replay runs the same layouts


def test_floor_benchmark_runs(tmp_path):
    from benchmarks import floor

    out = tmp_path / "floor.json"
    result = floor.main(["--tiny", "--repeats", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["estimator"] for r in rows] == ["elbo", "iwae", "iwae-dreg"]
    assert all(r["products"] > 0 and 0 < r["floor_ms"] for r in rows)
    assert result["threads"] == 1
