"""A task's quality metric: accuracy for classification and RMSE for regression, and which way is better."""

from source.quality_metric import ACCURACY, RMSE, metric_named, metric_of, quality_metric


def test_classification_is_measured_by_accuracy_and_regression_by_rmse():
    assert quality_metric("classification") == ("accuracy", True) == ACCURACY
    assert quality_metric("regression") == ("rmse", False) == RMSE
    name, higher_is_better = quality_metric("regression")
    assert (name, higher_is_better) == ("rmse", False)
    assert (ACCURACY.words, RMSE.words) == ("accuracy", "RMSE")
    assert metric_named("accuracy") is ACCURACY and metric_named("rmse") is RMSE


def test_a_record_carries_accuracy_or_else_rmse():
    assert metric_of({"split": "test", "loss": 0.3, "accuracy": 0.9}) is ACCURACY
    assert metric_of({"split": "validation", "loss": 0.3, "rmse": 51.2}) is RMSE


def test_the_best_value_is_the_highest_accuracy_or_the_lowest_rmse_first_of_equals():
    assert ACCURACY.best([0.5, 0.9, 0.7]) == 0.9
    assert RMSE.best([50.0, 40.0, 45.0]) == 40.0
    candidates = [(0.9, "first"), (0.9, "second"), (0.2, "third")]
    assert ACCURACY.best(candidates, key=lambda candidate: candidate[0]) == (0.9, "first")
    assert RMSE.best([(0.2, "a"), (0.2, "b")], key=lambda candidate: candidate[0]) == (0.2, "a")
