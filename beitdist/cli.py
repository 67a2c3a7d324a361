"""`beitdist` command line. Exit codes: 0 success, 1 the run failed, 2 bad input (one clear line)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from beitdist.errors import InputError, RunFailedError

log = logging.getLogger("beitdist")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DISTRIBUTED_COMMANDS = ("train", "evaluate")
"""Commands that may run as ranks of torchrun: they leave without gloo's teardown."""


def _cmd_convert(args: argparse.Namespace) -> int:
    from beitdist.checkpoint import export_hf, load_model, save_checkpoint
    from beitdist.output_paths import check_output_dir

    # refused before loading: consolidating a large run's shards takes minutes
    kind = "hf" if args.to == "data2vec-vision" else args.to  # both are transformers directories
    check_output_dir(args.output, kind, overwrite=args.overwrite, sources=[args.source])

    overrides = {}
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.rel_pos_bias is not None:
        overrides["rel_pos_bias"] = args.rel_pos_bias
    head = None if args.head == "none" else args.head
    from beitdist.recipe import apply_overrides

    head_options = apply_overrides({}, args.head_option, where="--head-option")  # the --set grammar
    model = load_model(args.source, head=head, head_options=head_options, new_head=args.new_head,
                       trust_pickle=args.trust_pickle, **overrides)
    if args.to == "onnx":
        from beitdist.onnx_export import ONNX_OPSET, export_onnx, preprocessing_of

        out, check = export_onnx(model, args.output, preprocessing=preprocessing_of(args.source, model),
                                 overwrite=args.overwrite, sources=(args.source,))
        print(f"wrote ONNX export {out}: opset {ONNX_OPSET}, input pixel_values (batch, {model.config.in_chans}, "
              f"{model.config.image_size[0]}, {model.config.image_size[1]}), head {model.head_name}; onnxruntime "
              f"{check.onnxruntime} vs PyTorch on batches {' and '.join(map(str, check.batches))}: max abs diff "
              f"{check.max_abs_diff:.2e}")
        return EXIT_OK
    if kind == "hf":
        model_type = "beit" if args.to == "hf" else args.to
        out = export_hf(model, args.output, overwrite=args.overwrite, model_type=model_type)
    else:
        out = save_checkpoint(model, args.output, overwrite=args.overwrite)
    config = model.config
    print(
        f"wrote {args.to} checkpoint {out}: {config.depth} blocks x {config.embed_dim}, "
        f"{config.image_size[0]}x{config.image_size[1]} px, head {model.head_name}"
    )
    return EXIT_OK


def _cmd_train(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from beitdist.console import ProgressBar, resume_line, world_note
    from beitdist.distributed import DistInfo, uses_cuda
    from beitdist.launcher import make_plan
    from beitdist.preflight import preflight
    from beitdist.recipe import with_environment
    from beitdist.recipe_cli import validate_file
    from beitdist.run import preemption
    from beitdist.run.rundir import RunDir
    from beitdist.train import run

    preemption.install()  # SIGTERM: stop after the current step with a checkpoint
    recipe = with_environment(validate_file(args.recipe, args.set, check_paths=not args.skip_paths))
    preflight(recipe, this_machine=not args.skip_paths, gpu=uses_cuda())
    dist = DistInfo.from_env()
    progress: Any = nullcontext()
    ranks = recipe.replace(scaling=dataclasses.replace(recipe.scaling, num_workers=dist.world_size))
    plan = make_plan(ranks, uses_cuda())
    problem = plan.fit_problem()
    if problem is not None:  # the same refusal as `launch`, before any rank starts
        raise InputError(problem)
    if dist.rank == 0:  # one voice for all ranks: the same plan and progress line as `launch`
        print(plan.describe(ranks))
        for line in (world_note(recipe, dist.world_size), resume_line(recipe)):
            if line:
                print(line)
        sys.stdout.flush()
        progress = ProgressBar(RunDir(recipe.run_dir).progress_file)
    with progress:
        result = run(recipe, dist)
    if result.final_dir is not None:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.metrics.items()))
        print(f"finished {recipe.name} at step {result.step}: {metrics}")
        print(f"final weights: {result.final_dir}")
    return EXIT_OK


def _cmd_launch(args: argparse.Namespace) -> int:
    from beitdist.launcher import launch, make_plan, uses_gpu
    from beitdist.preflight import preflight
    from beitdist.recipe import with_environment
    from beitdist.recipe_cli import validate_file

    # a dry run plans a recipe that may be meant for another machine: its data need not be here
    check_paths = not (args.skip_paths or args.dry_run)
    recipe = with_environment(validate_file(args.recipe, args.set, check_paths=check_paths))
    address = args.address or os.environ.get("RAY_ADDRESS")
    # a cluster's devices are known only once connected: "auto" is decided there
    gpu = None if address and recipe.scaling.use_gpu == "auto" else uses_gpu(recipe)
    preflight(recipe, this_machine=check_paths, gpu=gpu)
    plan = make_plan(recipe, uses_gpu(recipe))
    print(plan.describe(recipe))
    problem = plan.fit_problem()
    if problem is not None:  # refused before Ray starts; a dry run says the same
        raise InputError(problem)
    if args.dry_run:
        return EXIT_OK
    from beitdist.extras import require

    require("ray", "beitdist launch")
    from beitdist.console import resume_line

    resuming = resume_line(recipe)
    if resuming:
        print(resuming)
    result = launch(recipe, address=address, verbose=args.verbose)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result["metrics"].items()))
    print(f"finished {recipe.name} at step {result['step']}: {metrics}")
    print(f"final weights: {result['final_dir']}")
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    from beitdist.plan import GIB, activation_bytes, all_plans, count_parameters, smallest_fit
    from beitdist.recipe import load_recipe

    # every argument is checked before anything is printed: a half-printed table and then an
    # error reads as a result
    if args.gpus is not None and args.gpus < 1:
        raise InputError(f"--gpus: expected a number of ranks >= 1, got {args.gpus}")
    device_bytes = _parse_size(args.gpu_mem) if args.gpu_mem else None
    recipe = load_recipe(args.recipe, args.set)
    if device_bytes is None and recipe.scaling.gpu_memory_gb is not None:
        device_bytes = recipe.scaling.gpu_memory_gb * GIB
    backbone = recipe.model.backbone_config()
    world = args.gpus or recipe.scaling.num_workers
    params = count_parameters(backbone, recipe.head.name, recipe.head.options, recipe.model.freeze)
    activations = activation_bytes(backbone, recipe.data.batch_size, recipe.engine.precision,
                                   recipe.engine.activation_checkpointing)
    plans = all_plans(params, world, recipe.engine.precision, activations, largest_layer=params.largest_layer)
    print(f"{recipe.name}: {params / 1e6:.1f}M parameters, {backbone.image_size[0]} px, batch "
          f"{recipe.data.batch_size} per rank, {world} ranks, {recipe.engine.precision}")
    for p in plans:
        print("  " + p.describe())
    if device_bytes is not None:
        source = args.gpu_mem or f"{recipe.scaling.gpu_memory_gb:g} GB (scaling.gpu_memory_gb)"
        fit = smallest_fit(plans, device_bytes)
        print(f"smallest setting that fits {source}: " + (fit.describe().split("  ")[0] if fit else "none "
              "(add ranks, lower the batch, or turn on activation checkpointing)"))
    return EXIT_OK


SIZE_UNITS = {"T": 1024**4, "G": 1024**3, "M": 1024**2}


def _parse_size(text: str) -> float:
    """'80GB', '80G', '80GiB', '512MB', '80' (GB) -> bytes (binary units, as GPU memory is quoted)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = SIZE_UNITS.get(value[-1:])
    try:
        size = float(value[:-1] if scale else value) * (scale or SIZE_UNITS["G"])
    except ValueError:
        size = float("nan")
    if not size > 0 or size == float("inf"):
        raise InputError(f"--gpu-mem: expected a positive size like 80GB, 40GiB or 512MB, got {text!r}")
    return size


def _cmd_plugins(args: argparse.Namespace) -> int:
    from beitdist.plugins import get_registries

    registries = get_registries()
    sections = [("heads", registries.heads), ("tokenizers", registries.tokenizers), ("datasets", registries.datasets)]
    for title, registry in sections:
        print(f"{title}:")
        for entry in registry:
            print(f"  {entry.name:24} {entry.package:32} ({entry.plugin})")
        if not registry.names():
            print("  (none)")
    print("callbacks:")
    for entry in registries.callbacks:
        print(f"  {entry.name:24} {entry.package}")
    if not registries.callbacks:
        print("  (none)")
    return EXIT_OK


def _end_distributed_process(code: int, sync: bool = True) -> None:
    """Leave a multi-rank run without interpreter teardown: torch's gloo teardown aborts now and
    then (SIGABRT) after all work is done, which would turn a finished run into a failed one.
    `sync=False` skips the final barrier, for failures only some ranks saw (a failed checkpoint
    write): the others may be blocked in a collective, and the launcher ends them."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        if sync:
            dist.barrier()
            dist.destroy_process_group()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beitdist", description="Train BEiT vision transformers at any scale.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert",
        help="convert a unilm / timm / transformers / beitdist checkpoint",
        description="Read any supported checkpoint and write it as a transformers directory or a beitdist checkpoint.",
    )
    convert.add_argument("source", help="unilm .pth, timm state dict, transformers directory, beitdist checkpoint, "
                         "or a training run / DeepSpeed checkpoint directory (ZeRO shards are consolidated)")
    convert.add_argument("output", help="a new (or empty) output directory, written atomically; never the source, "
                         "a run directory or a directory holding other files")
    convert.add_argument("--to", choices=["hf", "data2vec-vision", "beitdist", "onnx"], default="hf",
                         help="hf: a transformers directory (Beit*); data2vec-vision: one of transformers' "
                         "Data2VecVision* (classification, segmentation, bare model); beitdist: beitdist's "
                         "checkpoint; onnx: model.onnx "
                         "(dynamic batch, checked against PyTorch with onnxruntime) + preprocessing.json")
    convert.add_argument("--head", default="auto",
                         help="head to build: auto (the checkpoint's own, default), none (backbone only), "
                         "or a registered head (see `beitdist plugins`)")
    convert.add_argument("--head-option", action="append", default=[], metavar="KEY=VALUE",
                         help="an option of the head to build (e.g. num_classes=100); changing the shape of the "
                         "checkpoint's own head replaces it with a fresh one")
    convert.add_argument("--new-head", action="store_true",
                         help="start the head fresh even when the checkpoint holds a trained one that fits")
    convert.add_argument("--image-size", type=int, help="new resolution: position tables are resampled")
    convert.add_argument("--rel-pos-bias", choices=["shared", "per_block", "none"])
    convert.add_argument("--overwrite", action="store_true",
                         help="replace an existing checkpoint of the same kind at OUTPUT (nothing else is ever replaced)")
    convert.add_argument("--trust-pickle", action="store_true", help="allow arbitrary unpickling (trusted files only)")
    convert.set_defaults(run=_cmd_convert)
    export = commands.add_parser(
        "export", parents=[], help="export a training run (or any checkpoint) as a transformers directory",
        description="Same as convert with --to hf by default: a run directory's final weights, or its newest "
        "complete DeepSpeed checkpoint consolidated to fp32.",
    )
    for action in convert._actions[1:]:
        export._add_action(action)
    export.set_defaults(run=_cmd_convert, to="hf")

    train = commands.add_parser(
        "train",
        help="train a recipe in this process (one rank; run it under torchrun for several)",
        description="Run the training loop of a recipe without Ray: a single process, or each rank of torchrun.",
    )
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    train.add_argument("--skip-paths", action="store_true",
                       help="do not check on this machine that the dataset files exist (a cluster's workers see other disks)")
    train.set_defaults(run=_cmd_train)

    launch = commands.add_parser(
        "launch", help="run a recipe on Ray Train (local machine or a cluster), DeepSpeed workers, MLflow",
        description="Validate the recipe, print the plan, schedule DeepSpeed workers with Ray Train, "
        "resume the run of the same name if it exists, and print the final metrics.",
    )
    launch.add_argument("recipe", help="recipe YAML file")
    launch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    launch.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    launch.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    launch.add_argument("--skip-paths", action="store_true",
                       help="do not check on this machine that the dataset files exist (a cluster's workers see other disks)")
    launch.set_defaults(run=_cmd_launch)

    plan = commands.add_parser("plan", help="per-rank memory under each ZeRO stage / offload for a recipe")
    plan.add_argument("recipe")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--gpus", type=int, help="number of ranks (default: the recipe's scaling.num_workers)")
    plan.add_argument("--gpu-mem", help="device memory per GPU, e.g. 80GB: report the smallest setting that fits "
                      "(default: the recipe's scaling.gpu_memory_gb)")
    plan.set_defaults(run=_cmd_plan)

    from beitdist.evaluate import add_evaluate_cli
    from beitdist.predict import add_predict_cli
    from beitdist.recipe_cli import add_validate_cli
    from beitdist.recipe_schema import add_schema_cli
    from beitdist.sweep.cli import add_tune_cli
    from beitdist.tokenizers.fit import add_tokenizer_cli

    add_validate_cli(commands)
    add_evaluate_cli(commands)
    add_predict_cli(commands)
    add_schema_cli(commands)
    add_tokenizer_cli(commands)
    add_tune_cli(commands)

    plugins = commands.add_parser(
        "plugins",
        help="list every head, tokenizer, dataset and callback, with the package it came from",
        description="List the installed plugins (built-ins and setuptools entry points of the group 'beitdist').",
    )
    plugins.set_defaults(run=_cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        code = run(args)
        if args.command in DISTRIBUTED_COMMANDS:
            _end_distributed_process(code)
        return code
    except InputError as err:
        print(f"beitdist {args.command}: error: {err}", file=sys.stderr)
        if args.command in DISTRIBUTED_COMMANDS:  # a rank of torchrun: leave without gloo's teardown (it can abort)
            _end_distributed_process(EXIT_BAD_INPUT, sync=False)
        return EXIT_BAD_INPUT
    except RunFailedError as err:
        print(f"beitdist {args.command}: run failed: {err}", file=sys.stderr)
        if args.command in DISTRIBUTED_COMMANDS:
            _end_distributed_process(err.exit_code, sync=err.all_ranks)
        return err.exit_code
    except KeyboardInterrupt as err:
        print(f"beitdist {args.command}: interrupted" + (f"; {err}" if str(err) else ""), file=sys.stderr)
        return EXIT_FAILED
    except Exception as err:  # a bug, not bad input: exit 1, the traceback under -v
        from beitdist.extras import missing_extra

        missing = missing_extra(err, f"beitdist {args.command}") if isinstance(err, ModuleNotFoundError) else None
        if missing is not None:  # an optional dependency (an extra) that is not installed: bad set-up, exit 2
            print(f"beitdist {args.command}: error: {missing}", file=sys.stderr)
            if args.command in DISTRIBUTED_COMMANDS:
                _end_distributed_process(EXIT_BAD_INPUT, sync=False)
            return EXIT_BAD_INPUT
        if args.verbose:
            log.exception("beitdist %s failed", args.command)
        print(f"beitdist {args.command}: internal error: {type(err).__name__}: {err}"
              + ("" if args.verbose else " (run with -v for the traceback)"), file=sys.stderr)
        if args.command in DISTRIBUTED_COMMANDS:
            _end_distributed_process(EXIT_FAILED, sync=False)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
