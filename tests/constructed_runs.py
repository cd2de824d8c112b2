"""Comparison folders as finished (or unfinished) comparisons leave them, built from chosen numbers.

``comparison_folder(root, text, results)`` writes <root>/<experiment name>/ with the comparison's
configuration.txt and, for each run of ``results`` ({run id ("sgd", "sgd/lr_0.1"): {seed:
(validation values, test value)}}), its configuration.txt and a metrics.jsonl whose validation
records hold those values in turn and whose test record holds the test value (None: the run has not
finished; "diverged": it diverged).
"""

import json

from source.comparison import read_comparison
from source.configuration import format_configuration
from source.registries import load_configuration


def records(validation, test, quality="accuracy"):
    """The metric records of one run: a training log, one validation record per value, and the end."""
    result = [{"step": 5, "split": "training", "loss": 1.0, quality: 0.5, "learning_rate": 0.1}]
    result += [
        {"step": 10 * number, "split": "validation", "loss": 0.5, quality: value, "elapsed_seconds": 1.0}
        for number, value in enumerate(validation, start=1)
    ]
    if test == "diverged":
        result.append({"step": 25, "split": "diverged", "reason": "the training loss is not finite"})
    elif test is not None:
        result.append({"step": 20, "split": "test", "loss": 0.4, quality: test, "best_step": 10})
    return result


def comparison_folder(root, text, results, quality="accuracy"):
    """Write the comparison folder of configuration ``text`` with the runs of ``results``; return it."""
    source = root / "comparison.txt"
    source.write_text(text)
    comparison = read_comparison(load_configuration(source))
    folder = comparison.folder if comparison.folder.is_absolute() else root / comparison.folder
    folder.mkdir(parents=True)
    (folder / "configuration.txt").write_text(text)
    for entry in comparison.entries:
        for point in entry.points():
            for seed, (validation, test) in results.get(point.id, {}).items():
                run = folder / point.id / f"seed_{seed}"
                run.mkdir(parents=True)
                configuration = comparison.run_configuration(point, seed)
                (run / "configuration.txt").write_text(format_configuration(configuration, ["constructed run"]))
                lines = "".join(json.dumps(record) + "\n" for record in records(validation, test, quality))
                (run / "metrics.jsonl").write_text(lines)
    return folder
