"""Redraw the figures and the results table of finished runs, without training.

    python -m source.plotting runs/compare_digits                  # into the comparison folder
    python -m source.plotting runs/a runs/b --out plots/a_and_b     # run folders side by side
    python -m source.plotting runs/compare_* --out report           # a report over several experiments

Each FOLDER is a comparison folder (all its entries) or a run folder (one entry; the seed folders
of one comparison entry join into one). Labels, data set and model come from each run's own
configuration.txt. Writes results.csv, results.md and every figure as .png and .pdf into --out,
by default into the comparison folder when there is exactly one. Folders of several experiments
(data set × model) make a report instead (source/plotting/paper_report.py): each experiment's
files in <out>/<data set>_<model>/, and figure grids, the test accuracy table and the performance
profile across them in --out. A problem with the input (a folder, a damaged metrics file, an --out
that is a file or not writable) ends with one line on stderr and exit status 2; a file the system
does not let it write or a figure that cannot be drawn, with one line and exit status 5
(``WriteFailed``), the tables written before it kept.
"""

import argparse
import sys
from pathlib import Path

from source.configuration import load_configuration
from source.errors import UserError, WriteFailed
from source.files import check_writable_folder
from source.plotting.paper_report import write_paper_report
from source.plotting.results import collect_entries, write_results
from source.records.run_files import CONFIGURATION_FILE

USAGE_ERROR = 2


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a one-line ``UserError``."""

    def error(self, message):
        raise UserError(f"{message} (see python -m source.plotting --help)")


def parse_arguments(argv):
    """The command line: FOLDER... and --out DIR."""
    parser = _ArgumentParser(
        prog="python -m source.plotting",
        description="Redraw figures and results table of run or comparison folders.",
        allow_abbrev=False,
    )
    parser.add_argument("folders", nargs="+", metavar="FOLDER", help="a run folder or a comparison folder")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="folder for the figures and the table (default: the comparison folder, when only one is given)",
    )
    return parser.parse_args(argv)


def _default_out(folders):
    """The one comparison folder given; ``UserError`` otherwise."""
    if len(folders) == 1 and load_configuration(Path(folders[0]) / CONFIGURATION_FILE, registries=None).is_comparison:
        return Path(folders[0])
    raise UserError("give --out DIR: without it the files go into the comparison folder, when it is the only folder")


def main(argv=None):
    """Entry point: returns 0 on success, 2 after a one-line error about the input, 5 when writing failed."""
    try:
        arguments = parse_arguments(argv)
        out = Path(arguments.out) if arguments.out else None
        if out is not None:
            check_writable_folder(out)
        entries = collect_entries(arguments.folders)
        if len({entry.experiment for entry in entries}) > 1:
            if out is None:
                raise UserError("give --out DIR: the folders hold several experiments, whose report goes there")
            files, table = write_paper_report(entries, out)
        else:
            out = out or _default_out(arguments.folders)
            files, table = write_results(entries, out)
    except UserError as error:
        print(f"error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return USAGE_ERROR
    except WriteFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return WriteFailed.EXIT_STATUS
    print(table, end="")
    print(f"written to {out}: {', '.join(str(path.relative_to(out)) for path in files)} (figures also as .pdf)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
