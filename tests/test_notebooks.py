"""Every notebook in ``notebooks/`` runs top to bottom in smoke mode and is committed stripped.

Smoke mode is the ``CI`` environment variable, which the notebooks read as ``smoke_test``
(the convention of Pyro's tutorials) to train and evaluate for a few seconds only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager, KernelManager
from nbclient import NotebookClient
from traitlets import default

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "python3"
CELL_TIMEOUT_S = 300


class _ThisPythonSpecs(KernelSpecManager):
    """Kernel specs that always run ipykernel in this interpreter (no files written)."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python 3 ({sys.executable})",
            language="python",
        )


class _ThisPythonKernelManager(AsyncKernelManager):
    """nbclient's default kernel manager, with the kernel spec of :class:`_ThisPythonSpecs`."""

    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self) -> KernelSpecManager:
        return _ThisPythonSpecs(data_dir=self.data_dir)


def _is_this_python(command: str) -> bool:
    """Whether ``command`` is this interpreter, in this environment's own bin folder."""
    found = shutil.which(command)
    if found is None:
        return False
    found, ours = os.path.abspath(found), os.path.abspath(sys.executable)
    return os.path.dirname(found) == os.path.dirname(ours) and os.path.samefile(found, ours)


def _kernel_manager_class() -> type[AsyncKernelManager]:
    """The registered ``python3`` kernel where it launches this interpreter, else our own."""
    try:
        command = KernelManager(kernel_name=KERNEL_NAME).format_kernel_cmd()
    except (NoSuchKernel, OSError, ValueError):  # missing or unreadable spec
        return _ThisPythonKernelManager
    if command and _is_this_python(command[0]):
        return AsyncKernelManager
    return _ThisPythonKernelManager


def _outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            yield from cell.outputs


def _repository_files() -> set[str]:
    """Files a user would see appear: untracked and not ignored (``git status``), or, outside
    a git checkout (an unpacked sdist), every file under the repository."""
    try:
        listing = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
        return {str(p) for p in REPO.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return {line[3:] for line in listing.splitlines() if line.startswith("??")}


def test_kernel_runs_this_interpreter():
    manager = _kernel_manager_class()(kernel_name=KERNEL_NAME)
    assert _is_this_python(manager.format_kernel_cmd()[0])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stripped(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == KERNEL_NAME
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {index} of {name} has outputs: strip them"
            assert cell.execution_count is None, f"cell {index} of {name} has an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, monkeypatch):
    monkeypatch.setenv("CI", "1")  # the kernel inherits this environment: smoke_test = True
    before = _repository_files()
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        kernel_manager_class=_kernel_manager_class(),
        timeout=CELL_TIMEOUT_S,
        # run where a user opens it, so a relative output path would land in the checkout
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    outputs = list(_outputs(nb))
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, f"{name} raised {[f'{e.ename}: {e.evalue}' for e in errors]}"
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert images, f"{name} displayed no image"
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "log-likelihood" in text, f"{name} printed no log-likelihood"
    left = sorted(_repository_files() - before)
    assert not left, f"{name} left files in the repository: {left}; write to a tempfile folder"
