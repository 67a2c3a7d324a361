"""`beitdist evaluate`: the evaluation of a finished run, or of any checkpoint, on 1..N processes.

The numbers are the training loop's own: the same head (`evaluate_batch`, `metric_state`,
`compute_metrics`), the same validation transform and the same batches. The validation split is
cut into the shards the run's ranks evaluated (`--shards`, default: the run's world size), and
each process evaluates every N-th shard, so one process, or N under torchrun, reproduces what a
run of any size logged (the padding of the last shards depends on how the split was cut).
The head's `detail_state` / `report` add what training never computes: per-class numbers and,
for classification, the confusion matrix. Results go to a JSON file (in the run: `eval/`) and to
the run's MLflow run.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from beitdist.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class EvalRequest:
    """What to evaluate and on what."""

    source: str
    data: str | None = None
    data_options: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    mode: str | None = None
    batch_size: int | None = None
    shards: int | None = None
    trust_pickle: bool = False


@dataclass
class EvalResult:
    metrics: dict[str, float]
    details: dict[str, Any]
    images: int
    seconds: float


# --------------------------------------------------------------------------- what to evaluate
def _is_run(path: Path) -> bool:
    from beitdist.run.rundir import RunDir

    return path.is_dir() and bool(RunDir.markers(path))


def resolve_recipe(request: EvalRequest, model: Any) -> tuple[Any, int]:
    """The recipe whose data and evaluation settings apply, and the number of shards: a run's own
    recipe (and world size), or a recipe around `--data` for a bare checkpoint; `--set` last."""
    from beitdist.recipe import apply_overrides, parse_recipe
    from beitdist.run.checkpoints import run_recipe, run_world_size

    path = Path(request.source)
    data: dict[str, Any] = {}
    shards = 1
    if _is_run(path):
        saved = run_recipe(path)
        if saved is None:
            raise InputError(f"{path}: a run directory without a complete checkpoint holding its recipe; evaluate "
                             "its final/ weights with --data DATASET instead")
        data = saved
        shards = run_world_size(path) or 1
    elif request.data is None:
        raise InputError(f"{path}: not a training run, so its data is unknown; name a dataset with --data "
                         "(see `beitdist plugins`) and its options with --data-option KEY=VALUE")
    else:
        config = model.config
        data = {"name": path.name or "checkpoint", "tracking": {"enabled": False},
                "model": {"backbone": {"embed_dim": config.embed_dim, "depth": config.depth,
                                       "num_heads": config.num_heads, "image_size": list(config.image_size),
                                       "patch_size": config.patch_size}},
                "head": {"name": model.head_name, "options": model.head.options() if model.head else {}}}
    if request.data is not None:
        data["data"] = {**data.get("data", {}), "dataset": request.data,
                        "options": apply_overrides({}, request.data_options, where="--data-option")}
    elif request.data_options:
        options = apply_overrides(data.get("data", {}).get("options", {}), request.data_options,
                                  where="--data-option")
        data["data"] = {**data.get("data", {}), "options": options}
    data = apply_overrides(data, request.overrides)
    if request.mode is not None:
        data = apply_overrides(data, [f"train.eval_mode={request.mode}"])
    if request.batch_size is not None:
        data = apply_overrides(data, [f"data.val_batch_size={request.batch_size}"])
    recipe = parse_recipe(data, where=str(path))
    return recipe, request.shards or shards


def load_for_evaluation(request: EvalRequest) -> Any:
    from beitdist.checkpoint import load_model

    model = load_model(request.source, "auto", trust_pickle=request.trust_pickle)
    if model.head is None:
        raise InputError(f"{request.source}: holds a backbone without a head; there is nothing to evaluate")
    return model


# ---------------------------------------------------------------------------------- the loop
class _Batches:
    """The validation batches of virtual shard `shard` of `shards`, prepared on `device` (MIM
    targets from the recipe's tokenizer)."""

    def __init__(self, recipe: Any, model: Any, shard: int, shards: int, device: torch.device,
                 tokenizer: Any) -> None:
        from beitdist.data.pipeline import build_loaders

        config = model.config
        _, loader = build_loaders(recipe.data, model.head_name, config.image_size[0], config.patch_size,
                                  rank=shard, world_size=shards, seed=recipe.seed,
                                  tokenizer_input_size=getattr(tokenizer, "input_size", None))
        if loader is None:
            raise InputError(f"dataset {recipe.data.dataset!r} has no validation split with these options; "
                             "set data.options (e.g. --data-option val_split=...)")
        self.loader, self.device, self.tokenizer = loader, device, tokenizer

    def __iter__(self) -> Any:
        for raw in self.loader:
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in raw.items()}
            if self.tokenizer is not None and "tokenizer_pixels" in batch:
                batch["labels"] = self.tokenizer.encode(batch["tokenizer_pixels"])
            yield batch


def _accumulate(totals: dict[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    for key, value in state.items():
        totals[key] = totals.get(key, 0) + value.double().cpu()


@torch.no_grad()
def run_evaluation(model: Any, recipe: Any, shards: int, rank: int = 0, world: int = 1,
                   device: torch.device | None = None) -> EvalResult:
    """Evaluate shards rank, rank + world, ... of `shards`; the sums are all-reduced when a
    process group of `world` > 1 ranks is up. Same arithmetic as `beitdist.run.evaluator`: each
    batch's loss times its images is summed per shard in batch order, the shards' sums are added in
    shard order, and the total is divided by the images."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    head = model.head
    tokenizer = None
    if recipe.tokenizer.name is not None:
        from beitdist import plugins

        tokenizer = plugins.tokenizer_class(recipe.tokenizer.name)(recipe.tokenizer.options).to(device).eval()
    forward = model.forward
    start = time.time()
    totals: dict[str, torch.Tensor] = {}
    shard_losses = torch.zeros(shards, dtype=torch.float64)
    images = 0
    for shard in range(rank, shards, world):
        loss_sum = torch.zeros((), dtype=torch.float64)
        for batch in _Batches(recipe, model, shard, shards, device, tokenizer):
            out = head.evaluate_batch(forward, batch, recipe.train.eval_mode)
            size = int(batch["pixel_values"].shape[0])
            loss_sum += float(model.loss(out, batch)) * size
            images += size
            _accumulate(totals, head.metric_state(out, batch))
            _accumulate(totals, head.detail_state(out, batch))
        shard_losses[shard] = loss_sum
    keys = sorted(totals)
    if world > 1:
        import torch.distributed as dist

        for key in keys:  # every rank holds every key: each has a shard (cmd_evaluate checks world <= shards)
            dist.all_reduce(totals[key])
        dist.all_reduce(shard_losses)
        count = torch.tensor([float(images)], dtype=torch.float64)
        dist.all_reduce(count)
        images = int(count.item())
    if images == 0:
        raise InputError("the validation split is empty: nothing was evaluated")
    loss = 0.0
    for shard_loss in shard_losses.tolist():  # added in rank order, as the all-reduce of a run does
        loss += shard_loss
    metrics = {f"val_{k}": v for k, v in head.compute_metrics(totals).items()}
    metrics["val_loss"] = loss / images
    return EvalResult(metrics, head.report(totals), images, time.time() - start)


# ---------------------------------------------------------------------------------- outputs
def results_path(request: EvalRequest, recipe: Any, out: str | None, name: str | None = None) -> Path:
    """--out, else `<run>/eval/<name>.json` (name: the eval mode); a bare checkpoint needs --out."""
    from beitdist.run.rundir import RunDir

    if out is not None:
        return Path(out)
    if _is_run(Path(request.source)):
        return RunDir(request.source).evaluation(name or recipe.train.eval_mode)
    raise InputError(f"{request.source}: not a training run; say where the results go with --out FILE.json")


def weights_of(source: Path) -> str | None:
    """Which weights a beitdist checkpoint (or a run's final/) holds: "raw", or "ema" (the model
    EMA, train.ema); None for other formats."""
    from beitdist.checkpoint import NATIVE_CONFIG
    from beitdist.run.rundir import RunDir

    for directory in (RunDir(source).final, source):
        try:
            return str(json.loads((directory / NATIVE_CONFIG).read_text()).get("weights", "raw"))
        except (OSError, ValueError, AttributeError):
            continue
    return None


def write_results(path: Path, request: EvalRequest, recipe: Any, result: EvalResult, shards: int, world: int
                  ) -> None:
    from beitdist.run.files import write_atomic

    if path.exists() and path.is_dir():
        raise InputError(f"--out {path}: is a directory; give a file name ending in .json")
    record = {
        "source": str(Path(request.source).resolve()), "dataset": recipe.data.dataset,
        "data_options": recipe.data.options, "eval_mode": recipe.train.eval_mode, "images": result.images,
        "shards": shards, "processes": world, "seconds": round(result.seconds, 3),
        "weights": weights_of(Path(request.source)), "metrics": result.metrics, **result.details,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=1) + "\n")


def confusion_picture(matrix: list[list[int]], cell: int = 0) -> Any:
    """A confusion matrix as an image: rows true classes, columns predictions, each row
    normalised (white 0 -> dark blue 1), the diagonal framed in red where it is not the row's max."""
    import numpy as np
    from PIL import Image

    counts = np.asarray(matrix, dtype=np.float64)
    k = counts.shape[0]
    cell = cell or max(4, min(32, 512 // max(k, 1)))
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    shade = (255 * (1 - rows)).astype(np.uint8)
    rgb = np.stack([shade, shade, np.full_like(shade, 255)], axis=-1)
    wrong = [i for i in range(k) if counts[i].sum() > 0 and counts[i].argmax() != i]
    for i in wrong:
        rgb[i, i] = (230, 40, 40)
    return Image.fromarray(rgb, "RGB").resize((k * cell, k * cell), Image.Resampling.NEAREST)


def log_to_run(run_dir: Path, recipe: Any, result: EvalResult, json_path: Path) -> bool:
    """Log the metrics (prefixed `eval_<mode>_`) and the JSON (and a confusion matrix picture) to
    the run's MLflow run; False, with a warning, when there is none or the store cannot be reached."""
    from beitdist.run.rundir import RunDir

    id_file = RunDir(run_dir).mlflow_run_id_file
    if not recipe.tracking.enabled or not id_file.exists():
        return False
    try:
        from mlflow import MlflowClient

        from beitdist.tracking import resolve_uri

        uri, _ = resolve_uri(recipe.tracking, run_dir)
        client = MlflowClient(tracking_uri=uri)
        run_id = id_file.read_text().strip()
        prefix = f"eval_{recipe.train.eval_mode.replace('-', '_')}_"
        step = int(client.get_run(run_id).data.metrics.get("step", 0))
        for key, value in result.metrics.items():
            client.log_metric(run_id, prefix + key.removeprefix("val_"), value, step=step)
        client.log_artifact(run_id, str(json_path), "evaluation")
        matrix = result.details.get("confusion_matrix")
        if matrix:
            picture = json_path.with_suffix(".confusion.png")
            confusion_picture(matrix).save(picture)
            client.log_artifact(run_id, str(picture), "evaluation")
        return True
    except Exception as err:  # the JSON is written; a tracking problem must not lose it
        log.warning("evaluation not logged to MLflow (%s: %s); the results are in %s", type(err).__name__, err,
                    json_path)
        return False


# ----------------------------------------------------------------------------------- the CLI
def _summary(result: EvalResult, recipe: Any) -> str:
    metrics = ", ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in sorted(result.metrics.items()))
    return (f"evaluated {result.images} images of {recipe.data.dataset} ({recipe.train.eval_mode}) in "
            f"{result.seconds:.1f} s: {metrics}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from beitdist.distributed import DistInfo, device_for, init_process_group

    request = EvalRequest(args.source, args.data, args.data_option, args.set, args.eval_mode, args.batch_size,
                          args.shards, args.trust_pickle)
    if args.shards is not None and args.shards < 1:
        raise InputError(f"--shards: expected >= 1, got {args.shards}")
    if not Path(args.source).exists():
        raise InputError(f"{args.source}: no such file or directory")
    if args.knn or args.linear_probe:
        return _cmd_representation(args, request)
    model = load_for_evaluation(request)
    recipe, shards = resolve_recipe(request, model)
    out = results_path(request, recipe, args.out)
    info = DistInfo.from_env()
    if info.world_size > shards:  # a process without a shard would hold no sums to all-reduce
        raise InputError(f"{info.world_size} processes for a split cut into {shards} shards; run at most {shards} "
                         f"processes, or cut it finer with --shards {info.world_size} (val_loss then differs from "
                         "the run's)")
    if info.world_size > 1:
        init_process_group(info)
    result = run_evaluation(model, recipe, shards, info.rank, info.world_size, device_for(info))
    if info.rank == 0:
        write_results(out, request, recipe, result, shards, info.world_size)
        print(_summary(result, recipe))
        per_class = result.details.get("per_class_iou") or result.details.get("per_class_accuracy")
        if per_class:
            known = [v for v in per_class if v is not None]
            print(f"per class ({len(per_class)}): worst {min(known):.4f}, best {max(known):.4f}" if known else "")
        print(f"results: {out}")
        if _is_run(Path(args.source)) and log_to_run(Path(args.source), recipe, result, out):
            print("logged to the run's MLflow run")
    return 0


def _cmd_representation(args: argparse.Namespace, request: EvalRequest) -> int:
    """`--knn` / `--linear-probe`: the backbone's features, whatever the head (a MIM run has no
    class head); one process. Results in <run>/eval/representation.json (or --out, which a bare
    checkpoint needs, as for the head's evaluation)."""
    from beitdist.checkpoint import load_model
    from beitdist.representation import representation_metrics
    from beitdist.run.files import write_atomic

    model = load_model(request.source, "auto", trust_pickle=request.trust_pickle)
    recipe, _ = resolve_recipe(request, model)
    out = results_path(request, recipe, args.out, "representation")  # refused before any compute
    metrics = representation_metrics(model, recipe, knn=args.knn, linear=args.linear_probe)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps({"source": str(request.source), "weights": weights_of(Path(request.source)),
                                  "dataset": recipe.data.dataset, "metrics": metrics}, indent=1))
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" ({recipe.data.dataset})")
    print(f"results: {out}")
    return 0


def add_evaluate_cli(commands: Any) -> None:
    parser = commands.add_parser(
        "evaluate", help="evaluate a finished run or any checkpoint (top-1/top-5, per class, confusion; mIoU, TTA)",
        description="Run the evaluation of a training run (its recipe's data and eval mode) or of any checkpoint "
        "load_model reads (then name the data with --data). One process, or N under torchrun. Results are "
        "written as JSON (a run: <run>/eval/<mode>.json) and logged to the run's MLflow run.")
    parser.add_argument("source", help="a run directory, or a checkpoint (transformers dir, unilm/timm file, "
                        "beitdist checkpoint)")
    parser.add_argument("--data", help="dataset plugin to evaluate on (default: the run's)")
    parser.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the dataset (the --set grammar)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the run's recipe (e.g. data.val_batch_size=64)")
    parser.add_argument("--eval-mode", choices=["whole", "slide", "ms-flip"],
                        help="whole images, sliding windows, or sliding windows at scales 0.5-1.75 with flips "
                        "(segmentation; default: the recipe's train.eval_mode)")
    parser.add_argument("--batch-size", type=int, help="validation batch size (default: the recipe's)")
    parser.add_argument("--shards", type=int, help="cut the split as this many ranks did (default: the run's world "
                        "size, 1 for a checkpoint): the samples repeated to even the shards, and so val_loss, then "
                        "match the run's")
    parser.add_argument("--out", help="the JSON results file (default for a run: <run>/eval/<mode>.json)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow arbitrary unpickling (trusted files only)")
    parser.add_argument("--knn", action="store_true",
                        help="instead of the head's evaluation: k-NN top-1 (cosine, k=20) of the backbone's features "
                        "on the dataset's labelled val split against its train split (a pretraining run too)")
    parser.add_argument("--linear-probe", action="store_true",
                        help="instead of the head's evaluation: top-1 of a logistic regression on the backbone's "
                        "frozen features (train split -> val split)")
    parser.set_defaults(run=cmd_evaluate)


__all__ = ["EvalRequest", "EvalResult", "add_evaluate_cli", "confusion_picture", "run_evaluation"]
