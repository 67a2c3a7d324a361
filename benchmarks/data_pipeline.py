"""Data-pipeline throughput: decoded + augmented images per second PER CPU CORE, for beitdist's two file
readers, the image-folder dataset (plugin `image_folder`) and the tar-shard stream (plugin `tar_shards`).

The JPEGs are real photographs, made offline from scikit-learn's two sample photos (china.jpg,
flower.jpg, 427x640): random crops resized to a shorter side of 224..512 px (ImageNet-like) and saved
at quality 90, written once as train/<class>/<id>.jpg and once as tar shards of <id>.jpg + <id>.cls.
Nothing is re-implemented: datasets, transforms and loaders come from `build_loaders`, exactly as the
Trainer builds them, with the `data` section of a recipe (augmentation, masking; image size from its
backbone, tokenizer side from its tokenizer):

- finetune-train: `ClassificationTrain` of --finetune-recipe (BEiT-base ImageNet-1k fine-tuning:
  RandomResizedCrop 224 bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, normalise, RandomErasing 0.25);
- finetune-eval:  `Eval` of the same recipe (resize the shorter side to 256, centre crop 224);
- mim-train:      `MimTrain` of --pretrain-recipe (colour jitter, flip, one crop resized to 224 bicubic
  and 112 lanczos for the tokenizer, blockwise mask of 75 patches);
- decode:         the reader alone (transform=None): file or tar member -> RGB PIL image.

(a) One process, no DataLoader workers, torch.set_num_threads(1): each row iterates the dataset the
loader would iterate (map-style: the `SkipCorrupt`-wrapped dataset, item by item; tar: the stream of
worker 0 of 1). That rate IS images/s per core. Rows are timed in --rounds interleaved slices, so
drifts of a shared machine hit every row alike. Batching and mixup (in the collate) are not included.
(b) The Trainer's `BeitLoader` (--workers, default 0 and 2; `--workers` alone skips these rows), so
with batching, collate and mixup/cutmix. 0 workers runs it in this process on one thread; with
workers, the rate is the steady state after the first `num_workers` batches of each pass (worker
start-up is reported apart) and per core = rate / num_workers (the workers decode, augment, collate
and mix; the main process only receives batches). On a machine with other jobs, workers compete with
them for the cores.

"cores / GPU" = --gpu-images-per-s divided by the per-core rate. The default, 1000 img/s, is an
ASSUMPTION (roughly BEiT-B training at 224 px on one A100 with bf16), not a measurement: pass the rate
your accelerator actually trains at. The files sit in the page cache after they are written, so this
measures CPU cost (decode + augmentation), not storage or network reads.

    python benchmarks/data_pipeline.py                                    # ~1-2 min on 2 cores
    python benchmarks/data_pipeline.py --seconds 10 --workers 1 2 4 --gpu-images-per-s 2500
    python benchmarks/data_pipeline.py --dataset-size 64 --seconds 1 --workers 0 --json /tmp/dp.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image, features
from torch.utils.data import IterableDataset

import beitdist
from beitdist.data.pipeline import BeitLoader, build_loaders
from beitdist.plugins import dataset_class
from beitdist.recipe import resolve_recipe_file
from beitdist.schema import parse

ROOT = Path(__file__).resolve().parent.parent
READERS = ("image_folder", "tar_shards")
TRANSFORMS = ("decode", "finetune-train", "finetune-eval", "mim-train")
LOADER_TRANSFORMS = ("finetune-train", "mim-train")


# ------------------------------------------------------------------------------------------- data
@dataclass
class DataStats:
    images: int = 0
    classes: int = 0
    shards: int = 0
    total_bytes: int = 0
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        short = [min(w, h) for w, h in zip(self.widths, self.heights)]
        return {"images": self.images, "classes": self.classes, "shards": self.shards,
                "total_mb": self.total_bytes / 2**20, "mean_jpeg_kb": self.total_bytes / self.images / 1024,
                "mean_width": float(np.mean(self.widths)), "mean_height": float(np.mean(self.heights)),
                "mean_megapixels": float(np.mean(np.multiply(self.widths, self.heights))) / 1e6,
                "short_side_min": min(short), "short_side_max": max(short), "short_side_mean": float(np.mean(short))}


def make_jpegs(count: int, seed: int = 0, quality: int = 90) -> Iterator[tuple[bytes, int, int]]:
    """(JPEG bytes, width, height): random crops of the sklearn sample photos, aspect 3:4..4:3 either way,
    resized (bicubic) to a shorter side uniform in 224..512, randomly mirrored."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(arr) for arr in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        short = int(rng.integers(224, 513))
        aspect = math.exp(rng.uniform(0.0, math.log(4 / 3)))
        width, height = (round(short * aspect), short) if rng.random() < 0.5 else (short, round(short * aspect))
        # the largest region of that aspect inside the photo, shrunk by a random factor, placed at random
        fit = min(photo.width / width, photo.height / height) * rng.uniform(0.5, 1.0)
        cw, ch = max(1, int(width * fit)), max(1, int(height * fit))
        left, top = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
        img = photo.crop((left, top, left + cw, top + ch)).resize((width, height), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        yield buf.getvalue(), width, height


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_datasets(workdir: Path, count: int, classes: int, shards: int, seed: int = 0
                   ) -> tuple[Path, list[Path], DataStats]:
    """The same JPEGs as an image folder (<root>/train/class<c>/<id>.jpg, torchvision's layout) and as
    `shards` tar files (<id>.jpg + <id>.cls, webdataset's layout, consecutive ids per shard)."""
    if count < 1 or classes < 1 or not 1 <= shards <= count:
        raise ValueError(f"need dataset size >= 1, classes >= 1 and 1 <= shards <= dataset size; got "
                         f"{count}, {classes}, {shards}")
    folder, shard_dir = workdir / "data_pipeline_images", workdir / "data_pipeline_shards"
    for d in (folder, shard_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    for c in range(classes):
        (folder / "train" / f"class{c}").mkdir(parents=True)
    stats = DataStats(images=count, classes=classes, shards=shards)
    bounds = np.linspace(0, count, shards + 1).round().astype(int)
    shard_paths = [shard_dir / f"train-{s:04d}.tar" for s in range(shards)]
    tars = [tarfile.open(p, "w") for p in shard_paths]
    try:
        for i, (data, width, height) in enumerate(make_jpegs(count, seed)):
            label, key = i % classes, f"{i:06d}"
            (folder / "train" / f"class{label}" / f"{key}.jpg").write_bytes(data)
            tar = tars[int(np.searchsorted(bounds, i, side="right")) - 1]
            _add_member(tar, f"{key}.jpg", data)
            _add_member(tar, f"{key}.cls", str(label).encode())
            stats.total_bytes += len(data)
            stats.widths.append(width)
            stats.heights.append(height)
    finally:
        for tar in tars:
            tar.close()
    return folder, shard_paths, stats


# ---------------------------------------------------------------------------------------- loaders
def recipe_data(path: Path) -> tuple[dict[str, Any], int, int, int | None]:
    """(data section, image size, patch size, tokenizer input size) of a recipe file (inherit resolved)."""
    recipe, _ = resolve_recipe_file(path)
    backbone = (recipe.get("model") or {}).get("backbone") or {}
    image_size = backbone.get("image_size", 224)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else int(image_size)
    tokenizer = ((recipe.get("tokenizer") or {}).get("options") or {}).get("input_size")
    return dict(recipe.get("data") or {}), image_size, int(backbone.get("patch_size", 16)), tokenizer


def reader_options(reader: str, folder: Path, shards: Sequence[Path], classes: int, shuffle_buffer: int
                   ) -> dict[str, Any]:
    """The recipe's `data.options` for a reader; the val split reads the train images again, so the eval
    rows decode the very same files."""
    if reader == "image_folder":
        return {"root": str(folder), "train_split": "train", "val_split": "train"}
    paths = [str(p) for p in shards]
    return {"num_classes": classes, "train": paths, "val": paths, "shuffle_buffer": shuffle_buffer, "label_ext": "cls"}


def build(reader: str, recipe: Path, task: str, options: dict[str, Any], batch_size: int, num_workers: int,
          tokenizer_size: int) -> tuple[BeitLoader, BeitLoader | None]:
    data, image_size, patch_size, tok = recipe_data(recipe)
    data.update(dataset=reader, options=options, batch_size=batch_size, val_batch_size=batch_size,
                num_workers=num_workers, pin_memory=False)
    return build_loaders(data, task, image_size, patch_size, seed=0,
                         tokenizer_input_size=(tok or tokenizer_size) if task == "mim" else None)


def endless(dataset: Any, set_epoch: Any) -> Iterator[Any]:
    """Items of a dataset, pass after pass, in the process that calls it (map-style by index; an
    IterableDataset as worker 0 of 1); `set_epoch(e)` before each pass."""
    epoch = 0
    while True:
        set_epoch(epoch)
        if isinstance(dataset, IterableDataset):
            yield from dataset
        else:
            for i in range(len(dataset)):
                yield dataset[i]
        epoch += 1


def single_process_streams(args: argparse.Namespace, folder: Path, shards: list[Path], classes: int
                           ) -> dict[tuple[str, str], Iterator[Any]]:
    streams: dict[tuple[str, str], Iterator[Any]] = {}
    for reader in args.readers:
        opts = reader_options(reader, folder, shards, classes, args.shuffle_buffer)
        plugin = dataset_class(reader)
        raw = plugin.build(parse(plugin.Options, opts, "data.options"), "train", None)
        if hasattr(raw, "set_distributed"):
            raw.set_distributed(0, 1, 0)
        streams[reader, "decode"] = endless(raw, getattr(raw, "set_epoch", lambda e: None))
        train, val = build(reader, args.finetune_recipe, "classification", opts, args.batch_size, 0,
                           args.tokenizer_size)
        streams[reader, "finetune-train"] = endless(train.dataset, lambda e, t=train: _set_epoch(t, e))
        assert val is not None
        streams[reader, "finetune-eval"] = endless(val.dataset, lambda e, v=val: _set_epoch(v, e))
        mim, _ = build(reader, args.pretrain_recipe, "mim", opts, args.batch_size, 0, args.tokenizer_size)
        streams[reader, "mim-train"] = endless(mim.dataset, lambda e, m=mim: _set_epoch(m, e))
    return {key: streams[key] for key in streams if key[1] in args.transforms}


def _set_epoch(loader: BeitLoader, epoch: int) -> None:
    """What BeitLoader.__iter__ does before a pass: the transform's epoch and the stream's."""
    loader.transform.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


# ------------------------------------------------------------------------------------------- timing
def time_single_process(streams: dict[tuple[str, str], Iterator[Any]], args: argparse.Namespace
                        ) -> dict[tuple[str, str], dict[str, Any]]:
    for stream in streams.values():
        for _ in range(args.warmup):
            next(stream)
    slice_s, slice_images = args.seconds / args.rounds, math.ceil(args.images / args.rounds)
    done = {key: {"images": 0, "seconds": 0.0, "round_rates": []} for key in streams}
    for _ in range(args.rounds):
        for key, stream in streams.items():
            count, start = 0, time.perf_counter()
            while True:
                next(stream)
                count += 1
                elapsed = time.perf_counter() - start
                if elapsed >= slice_s or count >= slice_images:
                    break
            done[key]["images"] += count
            done[key]["seconds"] += elapsed
            done[key]["round_rates"].append(count / elapsed)
    return done


def time_loader(loader: BeitLoader, num_workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """Steady-state img/s of a BeitLoader. In each pass the clock starts at the arrival of batch
    `max(1, num_workers)` (the workers' first wave, which includes forking them) and stops at the last
    batch taken; passes repeat until the timed windows add up to --seconds or --images timed images."""
    skip = max(1, num_workers)
    images, seconds, first_batch, passes = 0, 0.0, [], 0
    while images < args.images and seconds < args.seconds:
        passes += 1
        start = time.perf_counter()
        window_start, counted, now = None, 0, start
        for k, batch in enumerate(loader, start=1):
            now = time.perf_counter()
            if k == 1:
                first_batch.append(now - start)
            if k == skip:
                window_start = now
            elif k > skip:
                counted += len(batch["pixel_values"])
                if seconds + now - window_start >= args.seconds or images + counted >= args.images:
                    break
        if window_start is not None and counted:
            images, seconds = images + counted, seconds + now - window_start
        elif passes >= 2:
            raise ValueError(f"a pass gives at most {skip} batches of {loader.batch_size}: make --dataset-size "
                             f"larger or --batch-size smaller to time {num_workers} workers")
    return {"images": images, "seconds": seconds, "passes": passes, "first_batch_s": float(np.mean(first_batch))}


def loader_rows(args: argparse.Namespace, folder: Path, shards: list[Path], classes: int) -> list[dict[str, Any]]:
    rows = []
    for num_workers in args.workers:
        for reader in args.readers:
            opts = reader_options(reader, folder, shards, classes, args.shuffle_buffer)
            for transform in (t for t in LOADER_TRANSFORMS if t in args.transforms):
                recipe, task = ((args.finetune_recipe, "classification") if transform == "finetune-train"
                                else (args.pretrain_recipe, "mim"))
                loader, _ = build(reader, recipe, task, opts, args.batch_size, num_workers, args.tokenizer_size)
                timed = time_loader(loader, num_workers, args)
                rate = timed["images"] / timed["seconds"]
                rows.append({"reader": reader, "transform": transform, "mode": f"BeitLoader, {num_workers} workers",
                             "num_workers": num_workers, "cores": max(1, num_workers), "images_per_s": rate,
                             "images_per_s_per_core": rate / max(1, num_workers), **timed})
    return rows


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the JPEGs and shards go (default: a temp dir)")
    parser.add_argument("--dataset-size", type=int, default=256, help="JPEGs to make")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--readers", nargs="+", default=list(READERS), choices=READERS)
    parser.add_argument("--transforms", nargs="+", default=list(TRANSFORMS), choices=TRANSFORMS)
    parser.add_argument("--finetune-recipe", type=Path, default=ROOT / "recipes/beit_base_in1k_224.yaml")
    parser.add_argument("--pretrain-recipe", type=Path, default=ROOT / "recipes/beit_base_pretrain_in22k.yaml")
    parser.add_argument("--tokenizer-size", type=int, default=112,
                        help="MIM second view when the pretraining recipe names no tokenizer input_size")
    parser.add_argument("--seconds", type=float, default=4.0, help="time budget of each row")
    parser.add_argument("--images", type=int, default=2000, help="at most this many timed images per row")
    parser.add_argument("--warmup", type=int, default=8, help="untimed images per single-process row")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved slices of the single-process rows")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2],
                        help="DataLoader worker counts for the BeitLoader rows (0: in-process; none: skip them)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shuffle-buffer", type=int, default=0,
                        help="tar_shards shuffle buffer; 0 (off) by default: the buffer costs a list swap per item "
                             "but holds transformed items back, which a timing window would see as a burst")
    parser.add_argument("--gpu-images-per-s", type=float, default=1000.0,
                        help="training rate of ONE accelerator, an assumption (default: ~BEiT-B 224 px, A100, bf16)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/data_pipeline.json"))
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.images < 1 or args.rounds < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--seconds must be > 0, --images, --rounds and --batch-size >= 1, --warmup >= 0")
    if any(w < 0 for w in args.workers):
        parser.error("--workers must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"torch {torch.__version__}, Pillow {PIL.__version__} (libjpeg-turbo {features.version('jpg')}: "
          f"{bool(features.check_feature('libjpeg_turbo'))}), numpy {np.__version__}, "
          f"{platform.processor() or platform.machine()}, {cores} cores usable, load average {load}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        start = time.perf_counter()
        folder, shards, stats = write_datasets(workdir, args.dataset_size, args.classes, args.shards)
        data = stats.summary()
        print(f"data: {data['images']} JPEGs (quality 90) in {data['classes']} classes and {data['shards']} shards, "
              f"made in {time.perf_counter() - start:.1f} s; mean {data['mean_jpeg_kb']:.1f} KiB, "
              f"{data['mean_width']:.0f} x {data['mean_height']:.0f} px mean ({data['mean_megapixels']:.3f} MP), "
              f"shorter side {data['short_side_min']}..{data['short_side_max']} (mean {data['short_side_mean']:.0f})")
        print(f"recipes: {_rel(args.finetune_recipe)} (finetune-*), {_rel(args.pretrain_recipe)} (mim-train)")
        print(f"cores / GPU: at an ASSUMED {args.gpu_images_per_s:g} img/s per accelerator (--gpu-images-per-s)\n")

        rows = []
        timed = time_single_process(single_process_streams(args, folder, shards, args.classes), args)
        for (reader, transform), t in timed.items():
            rate = t["images"] / t["seconds"]
            rows.append({"reader": reader, "transform": transform, "mode": "1 process, 1 thread", "num_workers": 0,
                         "cores": 1, "images_per_s": rate, "images_per_s_per_core": rate, **t})
        rows.extend(loader_rows(args, folder, shards, args.classes))
    for row in rows:
        row["core_ms_per_image"] = 1e3 / row["images_per_s_per_core"]
        row["cores_per_gpu"] = args.gpu_images_per_s / row["images_per_s_per_core"]

    header = (f"{'reader':12} {'transform':14} {'mode':22} {'img/s':>8} {'img/s/core':>10} {'core-ms/img':>11} "
              f"{'cores/GPU':>9} {'images':>6}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['reader']:12} {row['transform']:14} {row['mode']:22} {row['images_per_s']:8.1f} "
              f"{row['images_per_s_per_core']:10.1f} {row['core_ms_per_image']:11.1f} "
              f"{row['cores_per_gpu']:9.1f} {row['images']:6d}")
    forked = [r for r in rows if r["num_workers"]]
    if len(rows) > len(timed):
        print(f"\nBeitLoader rows: batch {args.batch_size}, collate (stack; mixup/cutmix for finetune-train) "
              "included, timed after each pass's first wave of batches"
              + (f"; mean wait for the first batch of a pass (forking the workers): "
                 f"{np.mean([r['first_batch_s'] for r in forked]):.2f} s" if forked else ""))

    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {"torch": torch.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
                        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
                        "beitdist": beitdist.__version__, "cores": cores, "torch_threads": torch.get_num_threads(),
                        "load_average_start": load, "load_average_end": os.getloadavg() if load else None},
        "data": data,
        "gpu_images_per_s_assumed": args.gpu_images_per_s,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")
    return result


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
