"""The sweep's command line: ``python -m medvlp.sweep`` / ``medvlp sweep`` / ``make sweep``."""

from __future__ import annotations

import argparse
import sys

from medvlp import config as C
from medvlp.sweep.plan import SweepConfig
from medvlp.sweep.run import SweepFailed, SweepOutcome, run_sweep

HELP = "pre-train methods and evaluate them on tasks x label fractions x seeds (resumable); summary table and chart"
DESCRIPTION = (
    "Pre-train every method once (where no finished run exists under --runs), transfer it to every task x "
    "label fraction x seed, evaluate zero-shot / retrieval tasks on the run itself, and write summary.csv, "
    "summary.md (methods as rows, mean ± std over seeds) and summary.png under --out. Resumable: finished "
    "runs and combinations are skipped, an interrupted pre-training run continues from its last checkpoint. "
    "Runs on the synthetic demo world unless --roots / --pretrain-root name real datasets."
)
EXAMPLES = """examples:
  python -m medvlp.sweep                                    clip, mgca x classification, segmentation x 10 %, 100 %
  python -m medvlp.sweep --methods clip mgca g2d --tasks classification zeroshot --fractions 0.01 0.1 1 --seeds 0 1 2
  python -m medvlp.sweep --tasks classification:demo_covidx segmentation:demo_rsna retrieval
  python -m medvlp.sweep --tasks classification segmentation --roots chexpert=/data/chexpert \\
      siim_pneumothorax=/data/siim --pretrain-data mimic_cxr --pretrain-root /data/mimic-cxr-jpg/2.0.0
  python -m medvlp.sweep --dry-run                          list the combinations and what is done
"""



# --------------------------------------------------------------------------- command line
def _pairs(items: list[str], flag: str) -> dict[str, str]:
    example = "--experiments mgca=configs/experiment/mgca_vit_mimic.yaml" if flag == "--experiments" else f"{flag} chexpert=/data/chexpert"
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise C.ConfigError(f"{flag} {item}: expected NAME=PATH, e.g. {example}.")
        out[name] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The sweep's flags (``python -m medvlp.sweep`` and ``medvlp sweep``)."""
    d = SweepConfig()
    parser.add_argument("--methods", nargs="+", default=d.methods, metavar="METHOD", help=f"methods to pre-train (default {' '.join(d.methods)})")
    parser.add_argument("--tasks", nargs="+", default=d.tasks, metavar="TASK",
                        help="name[:data[:protocol]], name a registered task (medvlp list tasks; default "
                        + " ".join(d.tasks) + "); a transfer task's default data, protocol and metric are in "
                        "configs/downstream/<task>.yaml; evaluation tasks (zeroshot, retrieval) use the pre-training data's "
                        "test split")
    parser.add_argument("--fractions", nargs="+", type=float, default=d.fractions, metavar="F", help="label fractions (default 0.1 1)")
    parser.add_argument("--seeds", nargs="+", type=int, default=d.seeds, metavar="S", help="seeds of the transfer heads (default 0)")
    parser.add_argument("--out", default=d.out, help=f"where the summary goes (default {d.out})")
    parser.add_argument("--runs", default=d.runs, help=f"pre-training runs and their results, one folder per method (default {d.runs})")
    parser.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, metavar="N",
                        help=f"optimiser steps of each pre-training run (default {d.pretrain_steps}; 0 = the config's epochs)")
    parser.add_argument("--pretrain-data", default="", metavar="DATA", help="configs/data name to pre-train on (default: the method's, demo_cxr)")
    parser.add_argument("--pretrain-root", default="", metavar="PATH", help="data.root of the pre-training data (real data)")
    parser.add_argument("--pretrain-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more pre-training overrides, e.g. data.reports_root=/data/reports trainer.precision=bf16-mixed")
    parser.add_argument("--experiments", nargs="*", default=[], metavar="METHOD=FILE",
                        help="pre-train a method with a config file, e.g. mgca=configs/experiment/mgca_vit_mimic.yaml "
                             "(with --pretrain-steps 0 its own schedule)")
    parser.add_argument("--roots", nargs="*", default=[], metavar="DATA=PATH",
                        help="real datasets: data config name = its folder (e.g. chexpert=/data/chexpert siim_pneumothorax=/data/siim)")
    parser.add_argument("--max-epochs", type=int, metavar="N", help="downstream: at most this many epochs (default: the protocol's)")
    parser.add_argument("--max-steps", type=int, metavar="N", help="downstream: at most this many optimiser steps (quick runs)")
    parser.add_argument("--patience", type=int, metavar="N", help="downstream: early-stopping patience in epochs")
    parser.add_argument("--batch-size", type=int, metavar="N", help="downstream batch size")
    parser.add_argument("--lr", type=float, help="downstream learning rate")
    parser.add_argument("--dry-run", action="store_true", help="check everything and list the combinations; run nothing")
    parser.add_argument("--summary-only", action="store_true", help="write the summary of what is done so far; run nothing")
    return parser


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    settings = {k: getattr(args, k) for k in ("max_epochs", "max_steps", "patience", "batch_size", "lr")
                if getattr(args, k, None) is not None}
    return SweepConfig(methods=list(dict.fromkeys(args.methods)), tasks=list(dict.fromkeys(args.tasks)),
                       fractions=list(dict.fromkeys(args.fractions)), seeds=list(dict.fromkeys(args.seeds)),
                       out=args.out, runs=args.runs, pretrain_steps=args.pretrain_steps, pretrain_data=args.pretrain_data,
                       pretrain_root=args.pretrain_root, pretrain_overrides=list(args.pretrain_overrides),
                       experiments=_pairs(args.experiments, "--experiments"), roots=_pairs(args.roots, "--roots"),
                       settings=settings)


def cmd_sweep(args: argparse.Namespace) -> SweepOutcome:
    """Run the sweep of parsed flags; raises :class:`SweepFailed` when a combination failed."""
    cfg = config_from_args(args)
    outcome = run_sweep(cfg, dry_run=args.dry_run, summary_only=args.summary_only)
    if outcome.files:
        print(f"\n{outcome.files['md'].read_text()}\nwrote {', '.join(str(p) for p in outcome.files.values())}")
    if outcome.failures:
        raise SweepFailed(f"{len(outcome.failures)} of {len(outcome.rows)} combinations failed "
                          f"({', '.join(list(outcome.failures)[:3])}{', ...' if len(outcome.failures) > 3 else ''}); "
                          f"see {outcome.files.get('csv', cfg.out)}. Run the same command again to retry them.")
    return outcome


def main(argv: list[str] | None = None) -> int:
    """``python -m medvlp.sweep``: 0 when every combination is done, 1 when some failed, 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m medvlp.sweep", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and full tracebacks")
    args = add_arguments(parser).parse_args(argv)
    from medvlp.datamodules.base import DataError
    from medvlp.logs import setup_logging
    from medvlp.registry import RegistryError

    setup_logging(args.verbose)
    try:
        cmd_sweep(args)
    except SweepFailed as err:
        print(f"sweep: {err}", file=sys.stderr)
        return 1
    except (C.ConfigError, DataError, RegistryError, FileNotFoundError, OSError, ValueError) as err:
        if args.verbose:
            raise
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    return 0
