"""Benchmark sweep: methods x downstream tasks x label fractions x seeds, resumable, one summary.

``python -m medvlp.sweep --methods clip mgca --tasks classification segmentation --fractions 0.1 1``
(``make sweep``) pre-trains each method once where no finished run exists (``<runs>/<method>/``),
transfers its image encoder to every task x fraction x seed (:func:`medvlp.api.downstream`), evaluates
zero-shot / retrieval tasks on the run itself, and writes into ``<out>/``:

* ``summary.csv`` - one row per combination (method, task, data, protocol, fraction, seed, metric,
  value, seconds, status, result path, error);
* ``summary.md`` - methods as rows, one column per task x fraction, ``mean ± std (n)`` over the seeds;
* ``summary.png`` - the same numbers as grouped bars (one group per column, one bar per method).

Resumable at any point. A pre-training run is finished when its marker ``pretrain_done.json`` exists
(written after :func:`medvlp.api.fit` returns); a run without it continues from its last complete
checkpoint, or starts again when it has none. A combination is done when its
``<runs>/<method>/downstream/<task>-<data>-<protocol>-f<F>-s<seed>/result.json`` exists and parses (a
file cut short by a kill does not), so a sweep started again computes only what is missing. A
combination that fails is logged, marked ``failed`` in the summary and retried by the next sweep; the
others go on, and the sweep exits non-zero at the end.

A task is ``name[:data[:protocol]]`` (``classification``, ``classification:demo_covidx``,
``segmentation:demo_rsna:finetune``, ``detection:demo_object_cxr``, ``zeroshot``, ``retrieval``), where the
protocol is a mode or a paper's preset (``configs/protocol``: ``segmentation:siim_pneumothorax:g2d``);
each task's default data, protocol and headline metric come from its registered task object
(``configs/downstream/<task>.yaml``). Without ``--roots``
everything runs on the synthetic demo world (``data.root=demo``); ``--roots chexpert=/data/chexpert``
passes ``data.root`` to every task on ``chexpert`` and makes it the default data of classification
(in place of its demo copy), and ``--pretrain-data mimic_cxr --pretrain-root /data/mimic`` pre-trains
on the real download.
"""

from medvlp.sweep.cli import DESCRIPTION, EXAMPLES, HELP, add_arguments, cmd_sweep, config_from_args, main
from medvlp.sweep.plan import (
    DONE,
    REQUEST,
    RESULT,
    Combination,
    SweepConfig,
    TaskSpec,
    grid,
    parse_task,
    pretrain_data_of,
    pretrain_request,
    settings_for,
    validate,
)
from medvlp.sweep.report import Column, Row, aggregate, collect, headline, metric_label, write_summary
from medvlp.sweep.run import SweepFailed, SweepOutcome, ensure_pretrained, is_done, run_combination, run_sweep

__all__ = ["DONE", "DESCRIPTION", "EXAMPLES", "HELP", "REQUEST", "RESULT", "Column", "Combination", "Row", "SweepConfig",
           "SweepFailed", "SweepOutcome", "TaskSpec", "add_arguments", "aggregate", "cmd_sweep", "collect",
           "config_from_args", "ensure_pretrained", "grid", "headline", "is_done", "main", "metric_label", "parse_task",
           "pretrain_data_of", "pretrain_request", "run_combination", "run_sweep", "settings_for", "validate",
           "write_summary"]
