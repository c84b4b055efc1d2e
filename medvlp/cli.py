"""``medvlp`` command line: parse, compose the config, call one function of :mod:`medvlp.api`.

Heavy libraries (torch, Lightning, timm, transformers) are imported only by the sub-command that
needs them, so ``medvlp --help`` and ``medvlp list`` answer at once and a wrong ``data.root`` fails
before any of them loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from medvlp import sweep
from medvlp.logs import setup_logging

EXAMPLES = """examples:
  medvlp fit --method clip                        train on the built-in synthetic chest X-rays
  medvlp fit --method clip trainer.max_steps=50   ... for 50 optimiser steps
  medvlp fit --method clip --data demo_ct         ... on the synthetic CT volumes
  medvlp fit --method clip --data mimic_cxr data.root=/data/mimic-cxr-jpg/2.0.0
  medvlp fit --config configs/experiment/x.yaml data.root=/data/...
  medvlp fit --resume runs/clip-mimic-cxr-...     continue an interrupted run
  medvlp zeroshot --run runs/clip-...             per-finding zero-shot AUROC on the test split
  medvlp retrieve --run runs/clip-...             image<->report recall@1/5/10
  medvlp fit --method medblip                     3D volumes + EHR text into a Q-Former and a frozen LLM
  medvlp vqa --run runs/medblip-... --study ADNI-test:1 --question "What will this subject be diagnosed with?"
  medvlp preprocess --data rsna_pneumonia data.root=/data/rsna   decode every image once (cache)
  medvlp demo --out demo_data                     write the synthetic datasets
  medvlp list                                     methods, datamodules, encoders, tasks, configs
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medvlp",
        description="Medical vision-language pre-training: one interface for 2D and 3D methods.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show debug logs and full tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    fit = sub.add_parser("fit", help="pre-train a method", description="Pre-train a method. Overrides are key=value (e.g. trainer.max_steps=50).")
    fit.add_argument("--method", help="configs/method/<name>.yaml (default clip)")
    fit.add_argument("--data", help="configs/data/<name>.yaml (default demo_cxr: the synthetic chest X-rays)")
    fit.add_argument("--trainer", help="configs/trainer/<name>.yaml (default: default)")
    fit.add_argument("--config", help="a saved run config or configs/experiment/*.yaml")
    fit.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    fit.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    fit.add_argument("overrides", nargs="*", help="key=value config overrides")

    for name, text in (("zeroshot", "per-finding zero-shot AUROC of a run"), ("retrieve", "image<->report retrieval recall of a run"),
                       ("evaluate", "an evaluation task (--task, medvlp list tasks) of a run, on its data or another dataset")):
        ev = sub.add_parser(name, help=text, description=text.capitalize() + ".")
        if name == "evaluate":
            ev.add_argument("--task", required=True, help="a registered evaluation task, e.g. zeroshot or retrieval")
        ev.add_argument("--run", required=True, metavar="RUN_DIR")
        ev.add_argument("--data", default="", help="evaluate on another dataset (configs/data/<name>.yaml) at the run's "
                                                   "image size, channels and text length (default: the run's own)")
        ev.add_argument("--split", default="test", help="split to evaluate: test (default), val, train, or one the dataset defines (e.g. chexpert 5x200)")
        ev.add_argument("--protocol", default="", help="a paper's preset (configs/protocol: g2d, hlip, fvlm): its prompts, "
                                                       "input size and threshold rule for this task")
        ev.add_argument("--json", metavar="FILE", help="also write the result as JSON")
        ev.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.root=/other/copy")

    vq = sub.add_parser("vqa", help="answer questions about a study with a generative run (MedBLIP)",
                        description="Answer free-text questions about one study from its volume and EHR prompt (a run of a "
                                    "generative method, e.g. MedBLIP), and / or score the run on a CSV of reference answers "
                                    "(image,question,answer) by exact match and token-F1.")
    vq.add_argument("--run", required=True, metavar="RUN_DIR")
    vq.add_argument("--study", default="", help="study id (e.g. ADNI-test:3) or image path as the list writes it")
    vq.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    vq.add_argument("--split", default="test", help="split the study is in (default test)")
    vq.add_argument("--answers", default="", metavar="FILE", help="reference answers to score against (CSV image,question,answer)")
    vq.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    vq.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.root=/other/copy")

    pre = sub.add_parser(
        "preprocess", help="decode a 2D radiograph or CT dataset once into a cache that training reads",
        description="Decode every image of the splits once (the datamodule's own reader: DICOM VOI, MONOCHROME1, ...), "
                    "resize its longest side to data.image_size and store it as uint8 with the original size; CT "
                    "volumes (ct_rate) are stored oriented and resampled as int16 HU with spacing and origin. The "
                    "cache goes to data.preprocessed_dir (default: a folder under the medvlp cache keyed by root and "
                    "the settings the arrays depend on). Resumable: a re-run skips what is done. Training reads the "
                    "cache when its manifest matches (data.use_preprocessed=auto | true | false). Overrides are key=value.",
    )
    pre.add_argument("--data", required=True, help="configs/data/<name>.yaml (e.g. rsna_pneumonia, ct_rate)")
    pre.add_argument("--config", help="a saved run config or configs/experiment/*.yaml (its data section is used)")
    pre.add_argument("--workers", type=int, metavar="N", help="decoding processes (default data.num_workers, else the CPU count)")
    pre.add_argument("--splits", default="train,val,test", help="comma-separated splits to cache (default train,val,test)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.root=/data/rsna data.image_size=224")

    ex = sub.add_parser("explain", help="what a run looks at, as PNGs: word attention (MGCA), pseudo masks (G2D)",
                        description="Draw, for one study, where each report word attends in the image (the method's "
                                    "cross-modal token attention, MGCA; one PNG per word), or the image, its pseudo-mask "
                                    "target and the decoder's prediction side by side (G2D).")
    ex.add_argument("--run", required=True, metavar="RUN_DIR")
    ex.add_argument("--study", default="", help="study id (default: the first study of the split)")
    ex.add_argument("--split", default="test")
    ex.add_argument("--words", default="", help="MGCA: comma-separated words to draw (default: up to 8 finding words)")
    ex.add_argument("--out", help="output folder (default RUN_DIR/explain)")

    ds = sub.add_parser("downstream", help="transfer a run's image encoder to a labelled task (classification, segmentation, detection)",
                        description="Transfer the image encoder of a run to a labelled dataset, on a fraction of its "
                                    "training labels (the shared fraction files), with the papers' settings and early "
                                    "stopping on the validation split. classification: a linear head on the frozen encoder "
                                    "(protocol linear) or encoder + head (finetune); AUROC per label, accuracy for exclusive "
                                    "classes; roc.png. segmentation: a U-Net (CNN) or SETR decoder (ViT); Dice; overlays.png. "
                                    "detection: an FCOS detector on a feature pyramid of the encoder; mAP over IoU 0.40-0.75 "
                                    "(also MGCA's evaluation); precision_recall.png and overlays.png. Writes result.json.")
    ds.add_argument("--task", default="classification", metavar="TASK",
                    help="a registered transfer task (medvlp list tasks): classification (default), segmentation, detection, ...")
    ds.add_argument("--data", required=True, help="configs/data/<name>.yaml with labels / masks (e.g. demo_chexpert, covidx, demo_siim)")
    ds.add_argument("--run", required=True, metavar="RUN_DIR")
    ds.add_argument("--fraction", type=float, default=1.0, help="fraction of the training labels (e.g. 0.01, 0.1, 1)")
    ds.add_argument("--protocol", default="",
                    help="a paper's protocol preset (configs/protocol: mgca, g2d, hlip, fvlm), or a mode: linear / frozen: "
                         "encoder frozen (a linear head, or a trained decoder); finetune: all trained "
                         "(default: the task's mode and settings, configs/downstream/<task>.yaml)")
    ds.add_argument("--mode", choices=["linear", "frozen", "finetune"], help="the mode under a preset (default: the preset's)")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--lr", type=float, help="default: 5e-4 (linear), 1e-4 (finetune)")
    ds.add_argument("--batch-size", type=int, help="default: 48 (linear), 64 (finetune)")
    ds.add_argument("--max-epochs", type=int, help="default 50")
    ds.add_argument("--patience", type=int, help="early-stopping patience in epochs (default 10)")
    ds.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (quick runs)")
    ds.add_argument("--min-steps", type=int, help="early stopping counts its patience only after this many optimiser steps")
    ds.add_argument("--probe", choices=["adamw", "lbfgs"], help="classification, linear: the papers' AdamW head (default) "
                                                                "or CLIP's L-BFGS logistic regression (L2 chosen on val)")
    ds.add_argument("--augment", action="store_true", default=None,
                    help="classification, linear: train the head on the datamodule's augmented images through the frozen "
                         "encoder at every step (MGCA's code) instead of on features computed once")
    ds.add_argument("--decoder", choices=["fresh", "pretrained"], help="segmentation: a new decoder (default) or the run's "
                                                                       "pre-trained one (G2D's encoder-decoder transfer)")
    ds.add_argument("--bn", choices=["eval", "train"], help="segmentation / detection with a frozen encoder: its batch norms "
                                                            "keep pre-training statistics (eval, default) or use batch statistics "
                                                            "(train, as MGCA's code)")
    ds.add_argument("--detector", choices=["fcos", "retinanet", "faster_rcnn", "yolov3"], help="detection: the detector head (default fcos; yolov3: MGCA's)")
    ds.add_argument("--pyramid-channels", type=int, help="detection: width of the feature pyramid (default 256)")
    ds.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                    help="a setting of the task (repeatable; YAML values), e.g. --set decoder_channels=[32,16]")
    ds.add_argument("--out", help="output folder (default RUN_DIR/downstream/<task>-<data>-<protocol>-f<F>-s<seed>)")
    ds.add_argument("overrides", nargs="*", help="data.* and trainer.* overrides, e.g. data.root=/data/chexpert trainer.devices=2 trainer.strategy=ddp")

    from medvlp import importer

    importer.add_parser(sub)

    from medvlp import bench

    bench.add_arguments(sub.add_parser(
        "bench", help="how fast a method's training step runs here: samples/s, step split, memory, FLOPs, MFU, host reads",
        description=(bench.__doc__ or "").split("\n\n")[0]))
    rp = sub.add_parser("reproduce", help="a paper's tables under its protocol preset, beside the paper's numbers",
                        description="Run every row of a paper's tables (configs/protocol/<paper>.yaml: tables) with its "
                                    "protocol on a run and write <out>/table.md: the paper's value, ours and the difference "
                                    "per cell. Resumable: finished cells are read back.")
    rp.add_argument("--paper", required=True, help="a preset with tables, e.g. g2d")
    rp.add_argument("--run", metavar="[MODEL=]RUN_DIR", action="append",
                    help="the pre-trained run (e.g. made by medvlp import from the authors' weights); for a paper with several "
                         "models, MODEL=RUN_DIR per model (mgca: resnet50, vit; hlip: chest_ct, brain_mri, head_ct)")
    rp.add_argument("--roots", nargs="*", default=[], metavar="DATASET=PATH", help="the downloads, e.g. siim_pneumothorax=/data/siim "
                                                                                   "rsna_pneumonia=/data/rsna (rows without one are skipped)")
    rp.add_argument("--demo", action="store_true", help="the synthetic stand-ins, small settings (CPU minutes); without --run "
                                                        "the paper's method is pre-trained on the demo first")
    rp.add_argument("--max-steps", type=int, default=20, help="--demo: optimiser steps per transfer cell (default 20)")
    rp.add_argument("--pretrain-steps", type=int, default=100, help="--demo without --run: pre-training steps (default 100)")
    rp.add_argument("--fractions", type=float, nargs="*", help="only these label fractions (default: all the table has)")
    rp.add_argument("--rows", nargs="*", help="only the rows whose name contains one of these (e.g. SIIM grounding)")
    rp.add_argument("--out", default="", help="output folder (default results/<paper>)")
    rp.add_argument("--runs", default="runs/reproduce", help="--demo: where the pre-training run goes")

    demo = sub.add_parser("demo", help="write the synthetic demo datasets", description="Write the synthetic radiology world in the real dataset formats.")
    demo.add_argument("--out", required=True)
    demo.add_argument("--kind", default="all", choices=["all", "cxr", "ct", "brain_mri", "chexpert", "rsna", "siim", "nih14",
                                                        "covidx", "object_cxr", "rad_chestct", "cq500", "rsna_ich", "pub_brain5",
                                                        "medblip_mri", "adni"])
    demo.add_argument("--size", default="default", choices=["tiny", "default"])
    demo.add_argument("--seed", type=int, default=0)

    sweep.add_arguments(sub.add_parser("sweep", help=sweep.HELP, description=sweep.DESCRIPTION, epilog=sweep.EXAMPLES,
                                       formatter_class=argparse.RawDescriptionHelpFormatter))

    ls = sub.add_parser("list", help="list registered components and config files")
    ls.add_argument("what", nargs="?", default="all",
                    choices=["all", "methods", "datamodules", "image_encoders", "text_encoders", "tasks", "configs"])
    return p


def cmd_list(what: str) -> None:
    from medvlp import config as C
    from medvlp.registry import ALL

    width = max(len(name) for reg in ALL.values() for name in reg.names())
    for kind, reg in ALL.items():
        if what in ("all", kind):
            print(f"{kind}:")
            for name in reg.names():
                print(f"  {name:<{width}}  {reg.describe(name)}")
    if what in ("all", "configs"):
        for group in ("method", "encoder", "data", "trainer", "downstream", "experiment"):
            print(f"configs/{group}: {', '.join(C.group_options(group)) or '(none)'}")


def compose_fit(args: argparse.Namespace):
    """Compose and validate the fit config; ``data.root`` is checked before the method loads."""
    from medvlp import api
    from medvlp import config as C

    light = C.compose(args.method, args.data, args.trainer, args.config, args.overrides, sections=("data", "trainer", "optim", "run"))
    C.check_values(light)  # ranges first, then the data root: both before torch is imported
    api.resolve_data_root(light)
    cfg = C.compose(args.method, args.data, args.trainer, args.config, args.overrides)
    cfg.data.root = light.data.root
    return C.resolve(cfg)


def cmd_fit(args: argparse.Namespace) -> None:
    from medvlp import api
    from medvlp import config as C

    if args.resume:
        if args.method or args.data or args.config or args.overrides:
            raise C.ConfigError("--resume continues a run with its saved config; do not combine it with --method/--data/--config/overrides.")
        cfg = api.load_config(args.resume)
    else:
        cfg = compose_fit(args)
    if args.print_config:
        print(C.to_yaml(cfg))
        return
    run_dir = api.fit(cfg, resume=args.resume)
    if api.is_first_process():  # the processes a multi-GPU run launches say nothing
        print(f"\nrun directory: {run_dir}\nnext: medvlp zeroshot --run {run_dir}   |   medvlp retrieve --run {run_dir}")


def cmd_eval(args: argparse.Namespace, task: str) -> None:
    from medvlp import api
    from medvlp.cache import write_atomic
    from medvlp.downstream.task import get_task, print_table

    res = api.evaluate(args.run, tasks=(task,), split=args.split, data_overrides=args.overrides, data=args.data,
                       protocol=args.protocol)
    print_table(*get_task(task).rows(res))
    if args.json:  # whole or not at all: a killed process leaves no partial file
        write_atomic(Path(args.json), json.dumps(res, indent=2))


def cmd_vqa(args: argparse.Namespace) -> None:
    from medvlp import api
    from medvlp.cache import write_atomic
    from medvlp.downstream.task import get_task, print_table

    res = api.vqa(args.run, study=args.study, questions=args.question, split=args.split, references=args.answers,
                  data_overrides=args.overrides)
    for qa in res.get("answers", []):
        print(f"Q: {qa['question']}\nA: {qa['answer'] or '(the model generated no text)'}")
    if "vqa" in res:
        print_table(*get_task("vqa").rows(res))
    if args.json:
        write_atomic(Path(args.json), json.dumps(res, indent=2))


def cmd_downstream(args: argparse.Namespace) -> None:
    from medvlp import api
    from medvlp import config as C
    from medvlp.downstream.task import get_task, print_table

    settings = {"lr": args.lr, "batch_size": args.batch_size, "max_epochs": args.max_epochs, "patience": args.patience,
                "max_steps": args.max_steps, "detector": args.detector, "pyramid_channels": args.pyramid_channels,
                "min_steps": args.min_steps, "probe": args.probe, "augment": args.augment, "decoder": args.decoder, "bn": args.bn,
                "mode": args.mode}
    for item in args.settings:
        import yaml

        key, sep, value = item.partition("=")
        if not sep or not key:
            raise C.ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set max_epochs=5.")
        try:
            settings[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise C.ConfigError(f"--set {item}: the value is not valid YAML ({err}).") from None
    res = api.downstream(args.task, args.data, args.run, fraction=args.fraction, protocol=args.protocol, seed=args.seed,
                         overrides=args.overrides, out=args.out, **{k: v for k, v in settings.items() if v is not None})
    if not res:  # another process of a multi-process run (rank 0 prints)
        return
    print_table(*get_task(args.task).rows(res))
    print(f"wrote {', '.join(res['files'].values())}")


def cmd_import(args: argparse.Namespace) -> None:
    from medvlp.importer import cmd_import as run_import

    run_import(args)


def cmd_bench(args: argparse.Namespace) -> None:
    from medvlp.bench import cmd_bench as run_bench

    run_bench(args)


def cmd_reproduce(args: argparse.Namespace) -> None:
    from medvlp.reproduce import parse_roots, parse_runs, reproduce

    path, cells = reproduce(args.paper, run=parse_runs(args.run, args.paper), out=args.out, roots=parse_roots(args.roots), demo=args.demo,
                            max_steps=args.max_steps, pretrain_steps=args.pretrain_steps, fractions=args.fractions,
                            runs=args.runs, rows=args.rows)
    done = sum(c.status.startswith("done") for c in cells)
    print(path.read_text())
    print(f"wrote {path}: {done} of {len(cells)} cells computed")


def cmd_preprocess(args: argparse.Namespace) -> None:
    from medvlp import api
    from medvlp import config as C
    from medvlp.preprocess import datamodule_class, preprocess

    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits:
        raise C.ConfigError(f"--splits '{args.splits}' names no split; e.g. --splits train,val,test.")
    if args.workers is not None and args.workers < 0:
        raise C.ConfigError(f"--workers {args.workers} is not valid; give 0 or more (0 and 1 decode in this process).")
    cfg = C.compose(None, args.data, None, args.config, args.overrides, sections=("data", "trainer", "optim", "run"))
    datamodule_class(cfg.data.name)  # a 2D radiograph dataset, before its root is checked
    api.resolve_data_root(cfg)  # data.root=demo -> the generated synthetic dataset; checks the layout
    C.resolve(cfg)
    summary = preprocess(cfg.data, splits=splits, workers=args.workers, progress=not args.no_progress)
    print(summary.format())
    print("training reads it when the data config matches (data.use_preprocessed=auto); "
          "data.use_preprocessed=true makes it required.")


def cmd_explain(args: argparse.Namespace) -> None:
    from medvlp.downstream.explain import explain

    words = [w.strip() for w in args.words.split(",") if w.strip()] or None
    paths = explain(args.run, study=args.study, out=args.out, split=args.split, words=words)
    if paths and paths[0].name == "dense.png":
        print(f"wrote image | pseudo mask | prediction to {paths[0]}")
    elif paths:
        print(f"wrote {len(paths)} attention maps to {paths[0].parent}")
    else:
        print("no finding words in this study's report; pass --words")


def cmd_demo(args: argparse.Namespace) -> None:
    from medvlp.datamodules.demo import main_demo

    main_demo(args.out, kind=args.kind, size=args.size, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    setup_logging(args.verbose)
    from medvlp.config import ConfigError
    from medvlp.datamodules.base import DataError
    from medvlp.registry import RegistryError

    handlers: dict[str, Any] = {
        "fit": cmd_fit,
        "zeroshot": lambda a: cmd_eval(a, "zeroshot"),
        "retrieve": lambda a: cmd_eval(a, "retrieval"),
        "evaluate": lambda a: cmd_eval(a, a.task),
        "preprocess": cmd_preprocess,
        "explain": cmd_explain,
        "downstream": cmd_downstream,
        "reproduce": cmd_reproduce,
        "bench": cmd_bench,
        "import": cmd_import,
        "vqa": cmd_vqa,
        "sweep": sweep.cmd_sweep,
        "demo": cmd_demo,
        "list": lambda a: cmd_list(a.what),
    }
    try:
        handlers[args.command](args)
    except (ConfigError, DataError, RegistryError, FileNotFoundError, OSError, ValueError) as err:
        if args.verbose:
            raise
        print(f"medvlp {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
