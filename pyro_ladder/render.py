"""Diagrams of a model and its guide, drawn by ``pyro.render_model`` with Graphviz.

Two things are needed, and each gets a clear message when missing: the ``graphviz`` Python
package (``pip install graphviz`` or ``pip install pyro_ladder[render]``) builds the diagram
(its DOT text is then in ``.source``), and the Graphviz programs (``dot``; ``apt install
graphviz``, ``brew install graphviz`` or ``conda install graphviz``) turn it into a picture,
which writing a file and showing it in a notebook both do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyro

from .errors import ConfigError


def render_pair(
    model, guide, *args, filename=None, render_distributions: bool = True, **kwargs
) -> dict:
    """The diagrams of ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)``.

    Each is traced once on the arguments given (a small batch is enough). Latent sites are
    white, observed ones grey, plates are boxes; with ``render_distributions`` each node
    names its distribution. In a notebook a returned diagram displays as a picture.

    :param filename: a path such as ``"pair.png"``: writes ``pair-model.png`` and
        ``pair-guide.png`` beside it (the suffix picks the format: png, svg, pdf).
    :returns: ``{"model": graphviz.Digraph, "guide": graphviz.Digraph}``.
    :raises ConfigError: without the ``graphviz`` package, or, to write files, without the
        Graphviz ``dot`` program.
    """
    _require_graphviz()
    graphs = {
        role: pyro.render_model(
            fn, model_args=args, model_kwargs=kwargs, render_distributions=render_distributions
        )
        for role, fn in (("model", model), ("guide", guide))
    }
    if filename is not None:
        write_pictures(graphs, filename)
    return graphs


def write_pictures(graphs: dict, filename) -> list[Path]:
    """Write each diagram of ``graphs`` as ``<stem>-<role><suffix>`` beside ``filename``."""
    require_dot()
    path = Path(filename)
    fmt = path.suffix[1:] or "png"
    written = []
    for role, graph in graphs.items():
        target = path.with_name(f"{path.stem}-{role}")
        written.append(Path(graph.render(target, format=fmt, cleanup=True)))
    return written


def require_dot() -> None:
    """Raise :class:`ConfigError` unless the Graphviz ``dot`` program is on the PATH."""
    if shutil.which("dot") is None:
        raise ConfigError(
            "drawing a diagram as a picture needs the Graphviz programs, and 'dot' is not on "
            "the PATH: install Graphviz (apt install graphviz, brew install graphviz or conda "
            "install graphviz); the diagram's DOT text is in render_pair(...)['model'].source"
        )


def _require_graphviz() -> None:
    try:
        import graphviz  # noqa: F401
    except ImportError:
        raise ConfigError(
            "model pictures need the graphviz package: pip install graphviz "
            "(or pip install pyro_ladder[render]), and the Graphviz programs to draw them"
        ) from None
