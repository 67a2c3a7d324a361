"""`beitdist predict CHECKPOINT INPUTS...`: run a trained model on image files.

What it writes is the head's to say (`Head.prediction`): top-k classes per image as a CSV, or a
label map per image (PNG at the image's own size, plus a colour overlay). Images are read the way
the model was evaluated (the run's eval transform, or a transformers checkpoint's
`preprocessor_config.json`), EXIF orientation applied, RGBA / grayscale / palette converted by
transformers' RGB rules. A file that cannot be decoded is one warning and is skipped: one bad
JPEG in a folder of thousands must not lose the others' predictions.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from beitdist.errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
PREDICTIONS_CSV = "predictions.csv"


@dataclass(frozen=True)
class Found:
    """The images the inputs name, and what was named but holds none."""

    images: list[Path]
    unmatched: list[str]


def find_images(inputs: list[str]) -> Found:
    """Files as given (whatever their extension: the decoder decides), folders recursively
    (image extensions only: a folder's other files are not inputs), globs; sorted, de-duplicated."""
    images: list[Path] = []
    unmatched: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True) if Path(p).is_file())
        if not found:
            unmatched.append(item)
        images.extend(found)
    return Found(sorted(dict.fromkeys(images)), unmatched)


def read_image(path: Path) -> Any:
    """The decoded image (EXIF orientation applied, mode kept for the processor's RGB rules), or
    None with one warning naming the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image) or image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        log.warning("%s: skipped, not a readable image (%s: %s)", path, type(err).__name__, err)
        return None


# ------------------------------------------------------------------------ model and settings
@dataclass
class Predictor:
    model: Any
    processor: Any
    labels: list[str] | None

    @property
    def kind(self) -> str:
        return str(self.model.head.prediction)


def _label_names(source: Path, model: Any, recipe: Any) -> list[str] | None:
    """Names for the class ids: the run's dataset plugin's, or a transformers config's id2label
    unless it holds only transformers' placeholders (LABEL_0, ...)."""
    if recipe is not None:
        from beitdist.plugins import dataset_class
        from beitdist.schema import parse

        plugin = dataset_class(recipe.data.dataset)
        try:
            names = plugin.label_names(parse(plugin.Options, recipe.data.options, "data.options"))
        except InputError as err:  # the dataset is not on this machine: ids it is
            log.info("label names unavailable (%s)", err)
            names = None
        if names:
            return list(names)
    config = source / "config.json"
    if config.is_file():
        id2label = json.loads(config.read_text()).get("id2label") or {}
        names = [str(id2label.get(str(i), i)) for i in range(len(id2label))]
        if names and not all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            return names
    return None


def load_predictor(source: str, trust_pickle: bool = False) -> Predictor:
    from beitdist.checkpoint import load_model

    path = Path(source)
    if not path.exists():
        raise InputError(f"{source}: no such file or directory")
    return predictor_for(source, load_model(source, "auto", trust_pickle=trust_pickle))


def predictor_for(source: str, model: Any) -> Predictor:
    """The model with the preprocessing and class names its source implies."""
    from beitdist.data.pipeline import AugmentConfig
    from beitdist.data.presets import eval_processor
    from beitdist.data.processor import ImageProcessor
    from beitdist.recipe import parse_recipe
    from beitdist.run.checkpoints import run_recipe
    from beitdist.run.rundir import RunDir

    path = Path(source)
    if model.head is None or model.head.prediction is None:
        what = "a backbone without a head" if model.head is None else f"a {model.head.name!r} head"
        raise InputError(f"{source}: holds {what}, which predicts nothing to write; beitdist predict takes a model "
                         "whose head predicts classes or label maps (classification, segmentation, or a plugin head "
                         "declaring `prediction`)")
    saved = run_recipe(path) if path.is_dir() and RunDir.markers(path) else None
    recipe = parse_recipe(saved, where=str(path), plugins=False) if saved is not None else None
    size = model.config.image_size[0]
    if recipe is not None:
        processor = eval_processor(size, recipe.data.augment)
    elif (path / "preprocessor_config.json").is_file():
        processor = ImageProcessor.from_dict(json.loads((path / "preprocessor_config.json").read_text()))
    else:
        processor = eval_processor(size, AugmentConfig())
    return Predictor(model.eval(), processor, _label_names(path, model, recipe))


# ------------------------------------------------------------------------------- the loop
def _batches(paths: list[Path], size: int) -> Iterator[list[tuple[Path, Any]]]:
    batch: list[tuple[Path, Any]] = []
    for path in paths:
        image = read_image(path)
        if image is None:
            continue
        batch.append((path, image))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Progress:
    """`predict: 12/40 images` redrawn on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.live = total, 0, sys.stderr.isatty()

    def advance(self, count: int) -> None:
        self.done += count
        if self.live:
            sys.stderr.write(f"\rpredict: {self.done}/{self.total} images")
            sys.stderr.flush()

    def close(self) -> None:
        if self.live:
            sys.stderr.write("\n")


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def _class_rows(predictor: Predictor, logits: torch.Tensor, paths: list[Path], top_k: int) -> list[list[Any]]:
    probs = logits.float().softmax(dim=-1)
    scores, ids = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    names = predictor.labels
    rows = []
    for path, row_scores, row_ids in zip(paths, scores.tolist(), ids.tolist()):
        row: list[Any] = [_relative(path)]
        for score, index in zip(row_scores, row_ids):
            row += [names[index] if names and index < len(names) else index, f"{score:.6f}"]
        rows.append(row)
    return rows


def _label_map_png(classes: torch.Tensor) -> bytes:
    from PIL import Image

    array = classes.cpu().numpy()
    image = Image.fromarray(array.astype(np.uint8), "L") if array.max(initial=0) < 256 else Image.fromarray(
        array.astype(np.uint16))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _overlay_png(image: Any, classes: torch.Tensor) -> bytes:
    from beitdist.heads.pictures import overlay

    buf = io.BytesIO()
    overlay(image.convert("RGB"), classes.cpu()).save(buf, format="PNG")
    return buf.getvalue()


def _outputs_of(out_dir: Path, path: Path, kind: str) -> list[Path]:
    if kind == "classes":
        return [out_dir / PREDICTIONS_CSV]
    stem = _relative(path).replace(os.sep, "__").rsplit(".", 1)[0]
    return [out_dir / f"{stem}.labels.png", out_dir / f"{stem}.overlay.png"]


@torch.no_grad()
def predict(predictor: Predictor, paths: list[Path], out_dir: Path, *, top_k: int = 5, batch_size: int = 16
            ) -> int:
    """Predict every readable image of `paths` into `out_dir`; returns how many were predicted."""
    from beitdist.run.files import write_atomic

    model, kind = predictor.model, predictor.kind
    device = next(model.parameters()).device
    rows: list[list[Any]] = []
    done = 0
    progress = _Progress(len(paths))
    try:
        for batch in _batches(paths, batch_size):
            batch_paths = [p for p, _ in batch]
            pixels = predictor.processor([image for _, image in batch], return_tensors="pt")["pixel_values"]
            output = model(pixels.to(device))
            if kind == "classes":
                rows += _class_rows(predictor, output.logits, batch_paths, top_k)
            else:
                sizes = [(image.height, image.width) for _, image in batch]
                maps = predictor.processor.post_process_semantic_segmentation(output, target_sizes=sizes)
                for (path, image), classes in zip(batch, maps):
                    labels_png, overlay_png = _outputs_of(out_dir, path, kind)
                    write_atomic(labels_png, _label_map_png(classes))
                    write_atomic(overlay_png, _overlay_png(image, classes))
            done += len(batch)
            progress.advance(len(batch))
    finally:
        progress.close()
    if kind == "classes" and rows:
        k = (len(rows[0]) - 1) // 2
        header = ["path"] + [f"{what}_{i}" for i in range(1, k + 1) for what in ("label", "score")]
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([header, *rows])
        write_atomic(out_dir / PREDICTIONS_CSV, text.getvalue())
    return done


# ----------------------------------------------------------------------------------- the CLI
def cmd_predict(args: argparse.Namespace) -> int:
    if args.top_k < 1 or args.batch_size < 1:
        raise InputError(f"--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}")
    found = find_images(args.inputs)
    for item in found.unmatched:
        log.warning("%s: no such file, folder or matching image", item)
    if not found.images:
        raise InputError(f"no images found in {args.inputs} (files, folders holding images with extensions "
                         f"{', '.join(IMAGE_EXTENSIONS)}, or globs)")
    predictor = load_predictor(args.checkpoint, args.trust_pickle)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: is a file; give a directory")
    targets = {t for p in found.images for t in _outputs_of(out_dir, p, predictor.kind)}
    existing = sorted(str(t) for t in targets if t.exists())
    if existing and not args.overwrite:
        raise InputError(f"--out {out_dir}: already holds predictions ({existing[0]}{' ...' if len(existing) > 1 else ''}); "
                         "pass --overwrite to replace them, or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = predict(predictor, found.images, out_dir, top_k=args.top_k, batch_size=args.batch_size)
    skipped = len(found.images) - done
    if done == 0:
        raise InputError(f"none of the {len(found.images)} files could be read as an image; nothing was written")
    where = (str(out_dir / PREDICTIONS_CSV) if predictor.kind == "classes"
             else f"{out_dir} (<image>.labels.png label maps, <image>.overlay.png overlays)")
    print(f"predicted {done} images" + (f" ({skipped} unreadable, skipped)" if skipped else "") + f": {where}")
    return 0


def add_predict_cli(commands: Any) -> None:
    parser = commands.add_parser(
        "predict", help="predict classes (CSV) or label maps (PNG) for image files, folders or globs",
        description="Run a trained model (a run directory or any checkpoint load_model reads) on images. "
        "Classification: predictions.csv with the top-k labels and scores; segmentation: a label map PNG at "
        "each image's size and a colour overlay. Unreadable files are reported and skipped.")
    parser.add_argument("checkpoint", help="a run directory or a checkpoint")
    parser.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or globs")
    parser.add_argument("--out", default="predictions", help="output directory (default: ./predictions)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image in the CSV (default 5)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--overwrite", action="store_true", help="replace predictions already in --out")
    parser.add_argument("--trust-pickle", action="store_true", help="allow arbitrary unpickling (trusted files only)")
    parser.set_defaults(run=cmd_predict)


__all__ = ["Found", "Predictor", "add_predict_cli", "find_images", "load_predictor", "predict"]
