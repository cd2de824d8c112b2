"""Which metric measures a task's quality: accuracy for classification, RMSE for regression.

The one place that decides it, and which way is better. Evaluation logs the metric under its
``name`` ("accuracy" or "rmse"); whatever reads records, checkpoints or tables back asks
``metric_of`` or ``metric_named`` which metric it has.
"""

from typing import NamedTuple

__all__ = ["ACCURACY", "QUALITY_METRICS", "RMSE", "QualityMetric", "metric_named", "metric_of", "quality_metric"]


class QualityMetric(NamedTuple):
    """A quality metric: ``name`` as records and tables spell it, and whether higher values are better."""

    name: str
    higher_is_better: bool

    @property
    def words(self):
        """The metric as prose and figure labels name it: "accuracy", "RMSE"."""
        return _WORDS[self.name]

    def best(self, values, key=None):
        """The best of ``values`` (by ``key``), the first of equals."""
        choose = max if self.higher_is_better else min
        return choose(values) if key is None else choose(values, key=key)


ACCURACY = QualityMetric("accuracy", higher_is_better=True)
RMSE = QualityMetric("rmse", higher_is_better=False)
QUALITY_METRICS = {metric.name: metric for metric in (ACCURACY, RMSE)}
"""The quality metrics by name."""
_WORDS = {ACCURACY.name: "accuracy", RMSE.name: "RMSE"}


def quality_metric(task):
    """The metric that ranks a ``task``'s checkpoints and is reported on its test split."""
    return ACCURACY if task == "classification" else RMSE


def metric_named(name):
    """The quality metric called ``name`` ("accuracy" or "rmse")."""
    return QUALITY_METRICS[name]


def metric_of(record):
    """The quality metric a validation or test record (or result) carries: accuracy if it has one, else RMSE."""
    return ACCURACY if ACCURACY.name in record else RMSE
