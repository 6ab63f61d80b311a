import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_ladder import CheckpointError, LadderVAE
from pyro_ladder.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip_restores_config_weights_and_meta(tmp_path):
    vae = LadderVAE(6, (3, 2), (8, 4), inference="bottom-up", likelihood="gaussian")
    path = save_checkpoint(tmp_path / "checkpoint.pt", vae, {"dataset": "frey-faces"})
    loaded, meta = load_checkpoint(path)
    assert loaded.config == vae.config and meta == {"dataset": "frey-faces"}
    for (k, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left


def test_missing_truncated_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    path = save_checkpoint(tmp_path / "c.pt", LadderVAE(6, (3,), (8,)))
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupted"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a pyro_ladder checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class _Payload:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (open, ("/tmp/pyro_ladder_pwned", "w"))


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    buffer = io.BytesIO()
    torch.save({"format": "pyro_ladder.checkpoint", "version": 1, "evil": _Payload()}, buffer)
    (tmp_path / "evil.pt").write_bytes(buffer.getvalue())
    target = "/tmp/pyro_ladder_pwned"
    import os

    if os.path.exists(target):
        os.remove(target)
    with pytest.raises(CheckpointError, match="holds objects"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not os.path.exists(target)
    assert pickle  # the module is what torch.save uses underneath


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    vae = LadderVAE(6, (3,), (8,))
    payload = {"format": "pyro_ladder.checkpoint", "version": 1,
               "config": {**vae.config.to_dict(), "latent_dims": [4]}, "state_dict":
               vae.state_dict(), "meta": {}}
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "bad.pt")
    payload["config"] = {**vae.config.to_dict(), "depth": 3}
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="config is invalid"):
        load_checkpoint(tmp_path / "bad.pt")


def test_a_changed_weight_is_caught_by_the_digest(tmp_path):
    vae = LadderVAE(6, (3,), (8,))
    path = save_checkpoint(tmp_path / "c.pt", vae, {"dataset": "digits"})
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = payload["state_dict"][name] + 1e-6  # digest left as it was
    torch.save(payload, tmp_path / "altered.pt")
    with pytest.raises(CheckpointError, match="corrupted or was altered"):
        load_checkpoint(tmp_path / "altered.pt")
    payload["meta"]["dataset"] = "binarized-mnist"
    torch.save(payload, tmp_path / "altered.pt")
    with pytest.raises(CheckpointError, match="corrupted or was altered"):
        load_checkpoint(tmp_path / "altered.pt")


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_refused_or_harmless(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("flip")
    vae = LadderVAE(6, (3,), (8,))
    original = save_checkpoint(folder / "c.pt", vae, {"dataset": "digits"}).read_bytes()
    position = data.draw(st.integers(0, len(original) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = bytearray(original)
    damaged[position] ^= flip
    (folder / "d.pt").write_bytes(bytes(damaged))
    try:
        loaded, meta = load_checkpoint(folder / "d.pt")
    except CheckpointError:
        return
    # the byte was zip padding or an unused header field: the content is untouched
    assert meta == {"dataset": "digits"} and loaded.config == vae.config
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
