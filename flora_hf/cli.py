"""`flora-hf`: the FLORA pipeline from the command line.

Recipe commands (`run`, `train-dense`, `filter`, `train-supernet`, `search`, `finetune`) run the pipeline up to
that stage in the recipe's run directory, skipping stages whose output exists; `spvit-search` runs SPViT pruning
of the dense model (gate search, then fine-tuning). They work unchanged under `accelerate launch`. Model commands (`export`, `evaluate`, `macs`, `push`) act on checkpoints directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import FloraError
from .io import read_json

RECIPE_STAGES = ("run", "train-dense", "filter", "train-supernet", "search", "finetune", "spvit-search")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow options: `flora-hf run r.yaml --output-dir d seed=1`
    if extra and args.command in RECIPE_STAGES and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.handler(args)
    except FloraError as error:
        print(f"flora-hf {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flora-hf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in RECIPE_STAGES:
        summary = "SPViT-prune the dense model" if name == "spvit-search" else f"run the pipeline up to '{name}'"
        command = commands.add_parser(name, help=f"{summary} from a recipe YAML")
        command.add_argument("recipe", help="recipe YAML (see recipes/)")
        command.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. seed=1")
        command.add_argument("--output-dir", help="run directory (default: the recipe's output_dir)")
        command.add_argument("--overwrite", action="store_true", help="replace a run directory of another recipe")
        command.set_defaults(handler=run_recipe_stage)

    export = commands.add_parser("export", help="write the compact checkpoint of a subnet of a trained supernet")
    export.add_argument("supernet", help="supernet checkpoint directory")
    export.add_argument("subnet", help="JSON file: a {group: ratio} mapping or a search result (its best subnet)")
    export.add_argument("output", help="directory for the compact model (must not exist unless --overwrite)")
    export.add_argument("--image-processor", help="checkpoint or Hub id whose image processor to save alongside")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(handler=export_command)

    evaluate = commands.add_parser("evaluate", help="top-1/top-5, params, MACs and CPU latency of a model")
    evaluate.add_argument("model", help="compact or dense checkpoint directory (or Hub id)")
    evaluate.add_argument("--dataset", default="digits", help="digits, an imagefolder path or a Hub dataset")
    evaluate.add_argument("--split", default="test", choices=("train", "validation", "test"))
    evaluate.add_argument("--seed", type=int, default=0, help="split seed (must match the run's)")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.set_defaults(handler=evaluate_command)

    macs = commands.add_parser("macs", help="MACs and parameters per image of a checkpoint (or one of its subnets)")
    macs.add_argument("model", help="dense, compact or supernet checkpoint directory")
    macs.add_argument("--subnet", help="JSON {group: ratio} mapping (dense models and supernets)")
    macs.set_defaults(handler=macs_command)

    push = commands.add_parser("push", help="upload a compact model directory to the Hugging Face Hub")
    push.add_argument("directory")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.set_defaults(handler=push_command)
    return parser


def run_recipe_stage(args: argparse.Namespace) -> None:
    from .pipeline import prepare_run, run_pipeline
    from .recipe import load_recipe
    from .report import format_table

    recipe = load_recipe(args.recipe, args.overrides)
    run = prepare_run(recipe, args.output_dir, overwrite=args.overwrite)
    stage = args.command
    if stage == "spvit-search":
        from .spvit_pipeline import run_spvit

        report = run_spvit(run)
        if run.state.is_main_process:
            print(format_table(report))
            print(f"report: {run.path('spvit_report.json')}")
        return
    if stage in ("run", "finetune"):
        report = run_pipeline(run)
        if run.state.is_main_process:
            print(format_table(report))
            print(f"report: {run.path('report.json')}")
        return
    {"train-dense": lambda: run.dense, "filter": lambda: run.space, "train-supernet": lambda: run.supernet,
     "search": lambda: [run.search(*budget) for budget in run.budgets()]}[stage]()
    if run.state.is_main_process:
        print(f"{stage}: done in {run.output_dir}")


def export_command(args: argparse.Namespace) -> None:
    from transformers import AutoImageProcessor

    from .io import atomic_directory
    from .supernet import FloraSupernetForImageClassification

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FloraError(f"{output} exists; pass --overwrite to replace it")
    supernet = FloraSupernetForImageClassification.from_pretrained(args.supernet)
    subnet = _read_subnet(args.subnet)
    processor = AutoImageProcessor.from_pretrained(args.image_processor) if args.image_processor else None
    compact = supernet.export_subnet(subnet, image_processor=processor)
    with atomic_directory(output) as tmp:
        compact.save_pretrained(tmp)
    print(f"exported to {output}")


def evaluate_command(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoImageProcessor

    from .benchmarking import latency_ms
    from .checkpoints import COMPACT_MODEL_TYPES, DENSE_MODEL_TYPES, load_classifier
    from .data import collate_image_batch, load_image_dataset
    from .macs import count_macs, count_params
    from .metrics import load_accuracy_metric

    model = load_classifier(args.model, COMPACT_MODEL_TYPES + DENSE_MODEL_TYPES, "flora-hf compact or dense model")
    processor = AutoImageProcessor.from_pretrained(args.model)
    dataset = load_image_dataset(args.dataset, processor, seed=args.seed)[args.split]
    metric = load_accuracy_metric()
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_image_batch):
            metric.add_batch(predictions=model(pixel_values=batch["pixel_values"]).logits, references=batch["labels"])
    result = metric.compute()
    result.update(params=count_params(model), macs=count_macs(model), latency_ms_batch1=latency_ms(model))
    print(json.dumps(result, indent=2))


def macs_command(args: argparse.Namespace) -> None:
    from .checkpoints import (
        COMPACT_MODEL_TYPES,
        DENSE_MODEL_TYPES,
        SUPERNET_MODEL_TYPE,
        checkpoint_model_type,
        load_classifier,
    )
    from .macs import count_macs, count_params
    from .supernet import FloraSupernetForImageClassification

    if checkpoint_model_type(args.model) == SUPERNET_MODEL_TYPE:
        model = FloraSupernetForImageClassification.from_pretrained(args.model)
    else:
        model = load_classifier(args.model, COMPACT_MODEL_TYPES + DENSE_MODEL_TYPES, "ViT / DeiT / Swin classifier")
    subnet = _read_subnet(args.subnet) if args.subnet else None
    print(json.dumps({"macs": count_macs(model, subnet), "params": count_params(model, subnet)}))


def push_command(args: argparse.Namespace) -> None:
    from .hub import push_to_hub

    print(push_to_hub(args.directory, args.repo_id, private=args.private))


def _read_subnet(path: str) -> dict[str, float]:
    try:
        data = read_json(path)
    except (OSError, ValueError) as error:
        raise FloraError(f"cannot read subnet file {path}: {error}") from error
    if isinstance(data, dict) and "best" in data:
        data = data["best"]["subnet"]
    if not isinstance(data, dict):
        raise FloraError(f"{path} holds neither a subnet mapping nor a search result")
    return data


if __name__ == "__main__":
    sys.exit(main())
