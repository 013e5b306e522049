"""`evaluate` metrics shipped inside flora_hf, so they load offline and do not depend on the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

ACCURACY_METRIC_DIR = Path(__file__).resolve().parent / "flora_accuracy"
"""The `flora_accuracy` metric module: `flora_accuracy/flora_accuracy.py`, the layout `evaluate.load` needs."""


def load_accuracy_metric(**kwargs) -> evaluate.EvaluationModule:
    """The top-1 / top-5 accuracy metric as an `evaluate.EvaluationModule`, loaded from the installed file.

    `evaluate.load("accuracy")` fetches a script from the Hub; an absolute directory path holding
    `<dirname>/<dirname>.py` is loaded locally instead, with no network access. `kwargs` go to `evaluate.load`.
    """
    import evaluate  # imported here: it pulls in `datasets`, which `import flora_hf` should not pay for

    return evaluate.load(str(ACCURACY_METRIC_DIR), **kwargs)
