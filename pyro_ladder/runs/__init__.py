"""Training runs: a frozen spec of a run (:class:`RunSpec`), :func:`train` and
:func:`resume` from the spec to a run folder, the folder's format (:mod:`.folder`) and
the test-set policy the experiments share (:func:`test_set`)."""

from .spec import DATASETS_WITH_LABELS, RESUMABLE, RunSpec
from .testset import dynamic_binarization, test_set
from .training import build_model, evaluate_run, resume, summary, train

__all__ = [
    "DATASETS_WITH_LABELS",
    "RESUMABLE",
    "RunSpec",
    "build_model",
    "dynamic_binarization",
    "evaluate_run",
    "resume",
    "summary",
    "test_set",
    "train",
]
