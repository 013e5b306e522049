"""Top-1 / top-5 accuracy from classifier logits, as an `evaluate` metric that loads offline.

`evaluate`'s own "accuracy" metric lives on the Hub and takes class ids, so it can neither load without the
network nor give top-5. This script ships inside flora_hf; `flora_hf.metrics.load_accuracy_metric()` loads it by
absolute path. It imports only evaluate, datasets and numpy because evaluate copies it into its modules cache.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 and top-5 accuracy of image classification logits: the fraction of examples whose reference label is the
highest-scoring class (top-1) or among the five highest-scoring classes (top-5). With fewer than five classes,
top-5 counts every class and is therefore 1.0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row of logits (or probabilities) per example, one value per class.
    references (`list` of `int`): the true class id of each example.
Returns:
    top1 (`float`): top-1 accuracy in [0, 1].
    top5 (`float`): top-5 accuracy in [0, 1] (top-k with k = min(5, number of classes)).
Examples:
    >>> metric = flora_hf.metrics.load_accuracy_metric()
    >>> metric.compute(predictions=[[0.1, 2.0, 0.3], [1.5, 0.2, 0.1]], references=[1, 2])
    {'top1': 0.5, 'top5': 1.0}
"""


class FloraAccuracy(evaluate.Metric):
    """Top-1 / top-5 accuracy of logits; ties go to the lower class id, as `argmax` breaks them."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict:
        logits = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        if logits.ndim != 2 or len(logits) != len(labels) or not len(labels):
            raise ValueError(
                f"predictions must be one row of logits per reference; got shape {logits.shape} for "
                f"{len(labels)} references"
            )
        num_classes = logits.shape[1]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"references must be class ids in [0, {num_classes}); got {labels.min()}..{labels.max()}")
        # position of the reference in a descending sort that puts lower class ids first among equal scores
        reference = logits[np.arange(len(labels)), labels][:, None]
        lower_id = np.arange(num_classes)[None, :] < labels[:, None]
        position = ((logits > reference) | ((logits == reference) & lower_id)).sum(axis=1)
        return {"top1": float(np.mean(position < 1)), "top5": float(np.mean(position < min(5, num_classes)))}
