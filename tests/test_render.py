"""Model pictures: the diagrams' structure, and a clear message for each missing piece."""

import shutil
import sys
from pathlib import Path

import pytest
import torch

from pyro_ladder import ConfigError, LadderVAE
from pyro_ladder import render as render_module
from pyro_ladder.render import render_pair


@pytest.fixture
def pair():
    vae = LadderVAE(6, (3, 2), (8, 4), batch_norm=False)
    return vae.model, vae.guide, torch.zeros(4, 6)


def test_diagrams_show_the_sites_their_order_and_the_data_plate(pair):
    pytest.importorskip("graphviz")
    model, guide, x = pair
    graphs = render_pair(model, guide, x)
    assert set(graphs) == {"model", "guide"}
    model_src, guide_src = graphs["model"].source, graphs["guide"].source
    for src in (model_src, guide_src):
        assert "cluster_data" in src and "z2 -> z1" in src
    assert "z1 -> x" in model_src and "x [label=x fillcolor=gray" in model_src  # observed
    assert "x [" not in guide_src  # the guide samples no x
    assert "z2 ~ Normal" in model_src and "x ~ Bernoulli" in model_src


def test_without_the_graphviz_package_the_message_says_what_to_install(pair, monkeypatch):
    monkeypatch.setitem(sys.modules, "graphviz", None)  # import graphviz now fails
    with pytest.raises(ConfigError, match="pip install graphviz"):
        render_pair(*pair)


def test_without_the_dot_program_writing_a_picture_says_what_to_install(pair, tmp_path,
                                                                        monkeypatch):
    pytest.importorskip("graphviz")
    monkeypatch.setattr(render_module.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="'dot' is not on the PATH"):
        render_pair(*pair, filename=tmp_path / "pair.png")


def test_pictures_are_written_beside_the_filename(pair, tmp_path, monkeypatch):
    graphviz = pytest.importorskip("graphviz")
    if shutil.which("dot") is None:  # stand in for Graphviz: record what would be drawn
        monkeypatch.setattr(render_module.shutil, "which", lambda name: "/usr/bin/dot")

        def fake_render(self, filepath, format, cleanup):
            path = Path(f"{filepath}.{format}")
            path.write_text(self.source)
            return str(path)

        monkeypatch.setattr(graphviz.Digraph, "render", fake_render)
    graphs = render_pair(*pair, filename=tmp_path / "pair.svg")
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["pair-guide.svg", "pair-model.svg"]
    assert set(graphs) == {"model", "guide"}
