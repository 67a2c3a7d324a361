"""BEiT's central claim in miniature: MIM pretraining on unlabelled images, then fine-tuning, against
the same fine-tuning from random weights, with the same labelled budget, steps and hyperparameters.

    nice -n 10 python experiments/mim_vs_scratch/run.py --seeds 0 1 2 --label-fractions 0.1 1.0 \
        --out runs/mim_vs_scratch

Everything runs through beitdist's own command line (`beitdist tokenizer fit`, `beitdist train`), one
process per run, `--jobs` runs side by side:

1. the digits TRAINING split (1,438 of scikit-learn's 1,797 8x8 digits; the 359 validation images
   are held out of every step) is written as PNG files and `beitdist tokenizer fit` clusters their
   8x8-pixel patches (at 32 px) into a k-means codebook: the visual tokens;
2. per seed, `pretrain.yaml`: BEiT masked image modeling of the tiny backbone on those images,
   labels unused;
3. per seed and label fraction, `finetune.yaml` from the seed's pretrained weights (`model.init`);
4. the same `finetune.yaml` from random weights: identical steps, schedule and hyperparameters.

With `--v2`, a third arm, BEiT v2 (arXiv 2208.06366), with the same pretraining and fine-tuning budget:
(a) a teacher standing in for CLIP: `finetune.yaml` from random weights on all training labels
(`--teacher-steps`), or, with `--v2-teacher mim` and no labels at all, the first seed's v1
pretraining; (b) `vqkd.yaml`: the VQ-KD tokenizer, distilled from that teacher on the training
images, exported with `beitdist tokenizer export-vqkd`; (c) per seed, `pretrain_v2.yaml` (MIM against
the VQ-KD codes plus the patch-aggregation branch); (d) the same fine-tunes from its weights.
`--knn-every N` (default: every pretraining evaluation) switches on beitdist's representation checks
in every pretraining run (`train.representation`: k-NN top-1 and a linear probe on frozen features),
so both pretrainings are compared along the way, not only after fine-tuning.

Outputs in --out: `results.md` (table: validation top-1 at the last step, mean +- sample std over
seeds, per arm and fraction), `results.json` (every number, per-seed curves), `curves.png`
(validation top-1 during fine-tuning, masked-token accuracy and, with the representation checks,
k-NN / linear probe during pretraining; mean +- std bands), all three also logged as artifacts of an
MLflow run "summary" in the experiment `mim_vs_scratch` of `sqlite:///<out>/mlflow.db`. Each
training run keeps its own MLflow store in `<out>/runs/<name>/mlflow.db`; the curves are read
from there. A finished run (its `train_result.json` reached the requested step) is not run again,
so an interrupted experiment continues where it stopped; use a new --out for a new configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PRETRAIN_RECIPE = HERE / "pretrain.yaml"
PRETRAIN_V2_RECIPE = HERE / "pretrain_v2.yaml"
VQKD_RECIPE = HERE / "vqkd.yaml"
FINETUNE_RECIPE = HERE / "finetune.yaml"
PRETRAINING = {"pretrained": ("pretrain", PRETRAIN_RECIPE), "pretrained_v2": ("pretrain_v2", PRETRAIN_V2_RECIPE)}
"""Fine-tuning arm -> (name of its pretraining runs, their recipe)."""
LABELS = {"pretrained": "v1 (k-means)", "pretrained_v2": "v2 (VQ-KD)", "scratch": "scratch"}
IMAGE_SIZE, PATCH_SIZE = 32, 8  # the recipes' backbone: a 4 x 4 patch grid
SPLIT = {"val_fraction": 0.2, "seed": 0}  # finetune.yaml's data.options (the same split everywhere)

# A few steps of everything: checks the pipeline end to end (tests/test_experiment_mim_vs_scratch.py)
SMOKE = {"pretrain_steps": 4, "finetune_steps": 4, "eval_every": 2, "vocab_size": 16, "kmeans_iters": 3,
         "teacher_steps": 4, "vqkd_steps": 4}


def arms(args: argparse.Namespace) -> tuple[str, ...]:
    return ("pretrained", "pretrained_v2", "scratch") if args.v2 else ("pretrained", "scratch")


@dataclass
class Run:
    name: str
    recipe: Path
    sets: list[str]
    steps: int
    arm: str  # "pretrain" | "pretrain_v2" | "teacher" | "vqkd" | one of `arms`
    seed: int
    fraction: float | None = None
    after: str | None = None  # name of the run that must finish first
    export_to: Path | None = None  # a VQ-KD run: the tokenizer file written once it has finished
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)


def child_env(jobs: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    return env


def beitdist(args: Sequence[str], log_file: Path, env: dict[str, str]) -> float:
    """`python -m beitdist ARGS` with its output in log_file; seconds taken. Raises on failure."""
    cmd = [sys.executable, "-m", "beitdist", *args]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_file.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = log_file.read_text().splitlines()[-25:]
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}; log {log_file}:\n" + "\n".join(tail))
    return time.perf_counter() - start


def export_train_images(out: Path) -> int:
    """The digits training split as 8x8 RGB PNGs, exactly as the `digits` dataset plugin decodes them."""
    from beitdist.data.datasets import DigitsDataset, load_digits_arrays, stratified_split

    images, labels = load_digits_arrays()
    train, _ = stratified_split(labels, SPLIT["val_fraction"], SPLIT["seed"])
    split = DigitsDataset(images, labels, train)  # the plugin's own decoding
    out.mkdir(parents=True, exist_ok=True)
    for position, i in enumerate(train):
        split.load(position)[0].save(out / f"{int(i):04d}.png")
    return len(train)


def finished(run: Run, runs_dir: Path) -> dict[str, Any] | None:
    path = runs_dir / run.name / "train_result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("step") == run.steps and result.get("final_dir") else None


def teacher_dir(args: argparse.Namespace, runs_dir: Path) -> Path:
    """v2's teacher: a model trained on every training label (`teacher`), or, label-free, the first
    seed's v1 MIM pretraining."""
    name = "teacher" if args.v2_teacher == "supervised" else f"pretrain_s{args.seeds[0]}"
    return runs_dir / name / "final"


def plan_runs(args: argparse.Namespace, runs_dir: Path, codebook: Path, vqkd: Path) -> list[Run]:
    """In the order the runs are started (two at a time): nothing waits long for what it needs."""
    common = [f"output_dir={runs_dir}"]
    if args.eval_every:
        common.append(f"train.eval_every={args.eval_every}")
    runs: list[Run] = []
    if args.v2 and args.v2_teacher == "supervised":  # the teacher, then the tokenizer distilled from it
        runs.append(Run("teacher", FINETUNE_RECIPE, common + [
            "name=teacher", "seed=0", "model.init=null", "data.options.train_fraction=1.0",
            f"train.steps={args.teacher_steps}", *args.set_finetune], args.teacher_steps, "teacher", 0))
    pretraining = [f"train.steps={args.pretrain_steps}", f"data.mask_ratio={args.mask_ratio}",
                   f"head.options.vocab_size={args.vocab_size}"]
    if args.knn_every:
        pretraining.append(f"train.representation.every={args.knn_every}")
    v1 = [Run(f"pretrain_s{seed}", PRETRAIN_RECIPE, common + [
        f"name=pretrain_s{seed}", f"seed={seed}", f"tokenizer.options.path={codebook}", *pretraining,
        *args.set_pretrain], args.pretrain_steps, "pretrain", seed) for seed in args.seeds]
    runs += v1[:2]
    if args.v2:
        teacher = teacher_dir(args, runs_dir)
        runs.append(Run("vqkd", VQKD_RECIPE, common + [
            "name=vqkd", "seed=0", f"head.options.teacher={teacher}",
            f"head.options.num_codes={args.vocab_size}", f"train.steps={args.vqkd_steps}"],
            args.vqkd_steps, "vqkd", 0, after=teacher.parent.name, export_to=vqkd))
    runs += v1[2:]
    fine_tunes: dict[str, list[Run]] = {arm: [] for arm in arms(args)}
    for seed in args.seeds:
        for fraction in args.label_fractions:
            for arm in arms(args):
                name = f"{arm}_f{fraction:g}_s{seed}"
                pretrain = f"{PRETRAINING[arm][0]}_s{seed}" if arm in PRETRAINING else None
                init = str(runs_dir / pretrain / "final") if pretrain else "null"
                fine_tunes[arm].append(Run(name, FINETUNE_RECIPE, common + [
                    f"name={name}", f"seed={seed}", f"model.init={init}",
                    f"data.options.train_fraction={fraction}", f"train.steps={args.finetune_steps}",
                    *args.set_finetune], args.finetune_steps, arm, seed, fraction, after=pretrain))
    runs += fine_tunes["scratch"]
    if args.v2:
        runs += [Run(f"pretrain_v2_s{seed}", PRETRAIN_V2_RECIPE, common + [
            f"name=pretrain_v2_s{seed}", f"seed={seed}", f"tokenizer.options.path={vqkd}", *pretraining,
            *args.set_pretrain], args.pretrain_steps, "pretrain_v2", seed, after="vqkd") for seed in args.seeds]
    return runs + fine_tunes["pretrained"] + fine_tunes.get("pretrained_v2", [])


def execute(runs: list[Run], runs_dir: Path, jobs: int, env: dict[str, str]) -> None:
    """Runs start in `runs`' order, `jobs` at a time; a run waits for the run it needs (`after`),
    which was started before it, so nothing waits on a run that cannot start."""
    futures: dict[str, Future] = {}
    lock = threading.Lock()
    done = [0]

    def one(run: Run) -> Run:
        if run.after is not None:
            futures[run.after].result()  # raises if the pretraining failed
        previous = finished(run, runs_dir)
        if previous is None:
            args = ["-v", "train", str(run.recipe)]
            for item in run.sets:
                args += ["--set", item]
            run.seconds = beitdist(args, runs_dir / f"{run.name}.log", env)
            previous = finished(run, runs_dir)
            if previous is None:
                raise RuntimeError(f"{run.name}: no complete train_result.json after the run")
            (runs_dir / f"{run.name}.seconds").write_text(f"{run.seconds:.1f}\n")
            how = f"{run.seconds:.0f} s"
        else:  # finished by an earlier invocation: keep the time it took then
            timing = runs_dir / f"{run.name}.seconds"
            run.seconds = float(timing.read_text()) if timing.is_file() else 0.0
            how = "done before"
        if run.export_to is not None and not run.export_to.is_file():
            beitdist(["tokenizer", "export-vqkd", str(runs_dir / run.name), "--out", str(run.export_to)],
                     runs_dir / f"{run.name}_export.log", env)
        run.result = previous
        with lock:
            done[0] += 1
            key = next((k for k in ("val_top1", "val_mim_accuracy", "val_codebook_usage") if k in previous["metrics"]),
                       "val_loss")
            print(f"[{done[0]}/{len(runs)}] {run.name}: {how}, final {key} "
                  f"{previous['metrics'].get(key, math.nan):.4f}", flush=True)
        return run

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for run in runs:  # submitted in order: every pretraining is dequeued before its fine-tunes
            futures[run.name] = pool.submit(one, run)
        for future in futures.values():
            future.result()


def curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of metric `key` from the run's own MLflow store (beitdist's tracking callback)."""
    from mlflow import MlflowClient

    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    points = {m.step: m.value for m in client.get_metric_history(run_id, key)}
    return sorted(points.items())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[Run], runs_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    curves: dict[str, dict[str, Any]] = {}
    for fraction in args.label_fractions:
        for arm in arms(args):
            group = [r for r in runs if r.arm == arm and r.fraction == fraction]
            finals = [float(r.result["metrics"]["val_top1"]) for r in group]
            mean, std = mean_std(finals)
            rows.append({"label_fraction": fraction, "arm": arm, "val_top1_mean": mean, "val_top1_std": std,
                         "per_seed": {r.seed: v for r, v in zip(group, finals)},
                         "train_images": labelled_count(fraction)})
            curves[f"{arm}_f{fraction:g}"] = {str(r.seed): curve(runs_dir / r.name, "val_top1") for r in group}
    pretrain = {kind: {str(r.seed): pretraining_summary(r, runs_dir) for r in runs if r.arm == kind}
                for kind, _ in (PRETRAINING[arm] for arm in arms(args) if arm in PRETRAINING)}
    summary = {"rows": rows, "curves": curves, "pretrain": pretrain,
               "seconds": {r.name: round(r.seconds, 1) for r in runs}}
    for r in runs:
        if r.arm in ("teacher", "vqkd"):  # the v2 arm's ingredients: how good the teacher and the codes were
            summary[r.arm] = {k: v for k, v in r.result["metrics"].items() if k.startswith("val_")}
    if args.knn_every:
        teacher = teacher_dir(args, runs_dir) if args.v2 else None
        summary["representation_baselines"] = representation_baselines(args.seeds, teacher)
    return summary


def representation_baselines(seeds: Sequence[int], teacher: Path | None) -> dict[str, dict[str, float]]:
    """What the pretrainings' k-NN and linear-probe numbers are to be read against, with the same
    protocol (beitdist.representation) on the same splits: the backbone randomly initialised (mean
    over one initialisation per seed), the raw pixels of the evaluation view, and v2's teacher."""
    import torch

    from beitdist.checkpoint import load_model
    from beitdist.data.pipeline import build_labelled_eval_loaders
    from beitdist.model import build_model
    from beitdist.recipe import load_recipe
    from beitdist.representation import Features, features_of, knn_top1, linear_probe_top1

    recipe = load_recipe(FINETUNE_RECIPE)
    config = recipe.model.backbone_config()

    def scores(features: Features) -> dict[str, float]:
        return {"knn_top1": knn_top1(features), "linear_probe_top1": linear_probe_top1(features, seed=recipe.seed)}

    random_init = []
    for seed in seeds:
        torch.manual_seed(seed)  # one random initialisation per seed
        random_init.append(scores(features_of(build_model(config, None), recipe)))
    out = {"random_init": {k: statistics.fmean(r[k] for r in random_init) for k in random_init[0]}}

    def pixels(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batches = list(loader)
        return (torch.cat([b["pixel_values"].flatten(1) for b in batches]), torch.cat([b["labels"] for b in batches]))

    train, val = build_labelled_eval_loaders(recipe.data, IMAGE_SIZE, PATCH_SIZE, seed=recipe.seed)
    out["pixels"] = scores(Features(*pixels(train), *pixels(val)))
    if teacher is not None:
        out["teacher"] = scores(features_of(load_model(teacher, head=None), recipe))
    return out


def pretraining_summary(run: Run, runs_dir: Path) -> dict[str, Any]:
    """The pretraining's last masked-token accuracy and loss, its curve, the position prior of its
    tokens, and the k-NN / linear-probe curves of beitdist's representation checks (when on)."""
    metrics = run.result["metrics"]
    return {"val_mim_accuracy": metrics.get("val_mim_accuracy"), "val_loss": metrics.get("val_loss"),
            "curve": curve(runs_dir / run.name, "val_mim_accuracy"), "position_prior": position_prior(run),
            "knn": curve(runs_dir / run.name, "val_knn_top1"),
            "linear_probe": curve(runs_dir / run.name, "val_linear_probe_top1")}


def position_prior(run: Run) -> dict[str, float]:
    """The trivial MIM baseline for pretraining run `run`: predict each masked patch's token from its
    POSITION alone (token frequencies per grid position over one epoch of the run's own training
    views), scored on exactly the validation batches, masks and tokens the run is evaluated on.
    A masked-token accuracy (or loss) no better than this means the model has not yet learnt to
    use the visible patches. Uses beitdist's data pipeline and tokenizer, not a re-implementation."""
    import torch

    from beitdist import plugins
    from beitdist.data.pipeline import build_loaders
    from beitdist.recipe import load_recipe

    recipe = load_recipe(run.recipe, run.sets)
    backbone = recipe.model.backbone_config()
    tokenizer = plugins.tokenizer_class(recipe.tokenizer.name)(recipe.tokenizer.options).eval()
    train, val = build_loaders(recipe.data, "mim", backbone.image_size[0], backbone.patch_size, seed=recipe.seed,
                               tokenizer_input_size=tokenizer.input_size)
    vocab = recipe.head_options().vocab_size
    counts = None
    with torch.no_grad():
        for batch in train:
            ids = tokenizer.encode(batch["tokenizer_pixels"])  # (B, N)
            one_hot = torch.nn.functional.one_hot(ids, vocab).sum(0).double()  # (N, vocab)
            counts = one_hot if counts is None else counts + one_hot
        log_p = ((counts + 0.5) / (counts + 0.5).sum(-1, keepdim=True)).log()  # add-1/2 smoothing
        correct = loss = total = 0.0
        for batch in val:
            ids, mask = tokenizer.encode(batch["tokenizer_pixels"]), batch["bool_masked_pos"].bool()
            positions = torch.arange(ids.shape[1]).expand_as(ids)[mask]
            correct += float((log_p.argmax(-1)[positions] == ids[mask]).sum())
            loss -= float(log_p[positions, ids[mask]].sum())
            total += int(mask.sum())
    return {"val_mim_accuracy": correct / total, "val_loss": loss / total}


def labelled_count(fraction: float) -> int:
    from beitdist.data.datasets import load_digits_arrays, stratified_split

    _, labels = load_digits_arrays()
    return len(stratified_split(labels, SPLIT["val_fraction"], SPLIT["seed"], fraction)[0])


def write_table(summary: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    lines = [
        f"Validation top-1 on the 359 held-out digits after {args.finetune_steps} fine-tuning steps "
        f"(mean +- sample std over seeds {', '.join(map(str, args.seeds))}; MIM pretraining: "
        f"{args.pretrain_steps} steps, {args.vocab_size} tokens, mask ratio {args.mask_ratio:g}).",
        "",
        "| labelled images | arm | val top-1 (mean +- std) | per seed | - scratch |",
        "|---|---|---|---|---|",
    ]
    by_key = {(r["label_fraction"], r["arm"]): r for r in summary["rows"]}
    for fraction in args.label_fractions:
        scratch = by_key[(fraction, "scratch")]["val_top1_mean"]
        for arm in arms(args):
            row = by_key[(fraction, arm)]
            seeds = ", ".join(f"{v:.3f}" for v in row["per_seed"].values())
            gain = f"{row['val_top1_mean'] - scratch:+.3f}" if arm != "scratch" else ""
            lines.append(f"| {fraction:.0%} ({row['train_images']}) | {LABELS[arm]} | "
                         f"{row['val_top1_mean']:.3f} +- {row['val_top1_std']:.3f} | {seeds} | {gain} |")
    for arm in arms(args):
        if arm not in PRETRAINING:
            continue
        pre = [v for v in summary["pretrain"][PRETRAINING[arm][0]].values() if v["val_mim_accuracy"] is not None]
        if not pre:
            continue
        (m, s), (pm, _), (pl, _) = (mean_std([v["val_mim_accuracy"] for v in pre]),
                                    mean_std([v["position_prior"]["val_mim_accuracy"] for v in pre]),
                                    mean_std([v["position_prior"]["val_loss"] for v in pre]))
        line = (f"{LABELS[arm]} pretraining, on the validation images: masked-token accuracy {m:.3f} +- {s:.3f}"
                + (f", loss {mean_std([v['val_loss'] for v in pre])[0]:.3f} nats" if arm == "pretrained" else "")
                + f". Baselines on the same masked patches: chance 1/{args.vocab_size} = {1 / args.vocab_size:.3f}; "
                f"predicting each token from its grid position alone: accuracy {pm:.3f}, loss {pl:.3f} nats.")
        knn = [v["knn"][-1][1] for v in pre if v["knn"]]
        probe = [v["linear_probe"][-1][1] for v in pre if v["linear_probe"]]
        if knn:
            line += (f" Frozen features after pretraining (train.representation): k-NN top-1 "
                     f"{mean_std(knn)[0]:.3f} +- {mean_std(knn)[1]:.3f}")
            line += f", linear probe {mean_std(probe)[0]:.3f} +- {mean_std(probe)[1]:.3f}." if probe else "."
        lines += ["", line]
    if "representation_baselines" in summary:
        named = {"random_init": "the backbone randomly initialised (mean over the seeds)", "pixels": "the raw pixels",
                 "teacher": "v2's teacher"}
        lines += ["", "The same k-NN / linear probe on " + "; ".join(
            f"{named[k]}: {v['knn_top1']:.3f} / {v['linear_probe_top1']:.3f}"
            for k, v in summary["representation_baselines"].items()) + "."]
    if "vqkd" in summary:
        vq = summary["vqkd"]
        teacher = (f"all training labels, {args.teacher_steps} steps): val top-1 "
                   f"{summary['teacher'].get('val_top1', math.nan):.3f}" if "teacher" in summary else
                   f"no labels: the v1 pretraining of seed {args.seeds[0]})")
        lines += ["", f"v2's teacher ({teacher}. VQ-KD tokenizer ({args.vqkd_steps} steps): "
                  f"codebook usage {vq.get('val_codebook_usage', math.nan):.2f}, perplexity "
                  f"{vq.get('val_codebook_perplexity', math.nan):.1f}, cosine to the teacher's features "
                  f"{vq.get('val_rec_cosine', math.nan):.3f}."]
    path.write_text("\n".join(lines) + "\n")


COLORS = {"pretrained": "tab:blue", "pretrained_v2": "tab:green", "scratch": "tab:orange"}


def _band(ax: Any, per_seed: dict[str, list[tuple[int, float]]], color: str, label: str, **style: Any) -> None:
    """Mean +- sample std over seeds at the steps every seed has."""
    import numpy as np

    curves = [c for c in per_seed.values() if c]
    if not curves:
        return
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    if not steps:
        return
    values = np.array([[dict(c)[s] for s in steps] for c in curves])
    mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(steps))
    ax.plot(steps, mean, marker="o", ms=3, color=color, label=f"{label} (n={len(values)})", **style)
    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)


def plot(summary: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = args.label_fractions
    knn = any(v["knn"] for runs in summary["pretrain"].values() for v in runs.values())
    panels = len(fractions) + 1 + int(knn)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels + 2.2 * knn, 4.0), squeeze=False)
    for ax, fraction in zip(axes[0], fractions):
        for arm in arms(args):
            _band(ax, summary["curves"][f"{arm}_f{fraction:g}"], COLORS[arm], LABELS[arm])
        ax.set_title(f"fine-tuning, {fraction:.0%} of the labels ({labelled_count(fraction)} images)", fontsize=10)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("validation top-1 (359 digits)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    ax = axes[0][len(fractions)]
    for arm in (a for a in arms(args) if a in PRETRAINING):
        runs = summary["pretrain"][PRETRAINING[arm][0]]
        _band(ax, {seed: v["curve"] for seed, v in runs.items()}, COLORS[arm], LABELS[arm])
        priors = [v["position_prior"]["val_mim_accuracy"] for v in runs.values()]
        if priors:
            ax.axhline(sum(priors) / len(priors), color=COLORS[arm], ls=":", lw=1.2, label=f"{LABELS[arm]}: position prior")
    ax.axhline(1 / args.vocab_size, color="grey", ls="--", lw=1, label="chance")
    ax.set_title(f"MIM pretraining ({args.vocab_size} tokens, mask {args.mask_ratio:g})", fontsize=10)
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("masked-token accuracy (val images, own tokens)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if knn:
        ax = axes[0][-1]
        for arm in (a for a in arms(args) if a in PRETRAINING):
            runs = summary["pretrain"][PRETRAINING[arm][0]]
            _band(ax, {seed: v["knn"] for seed, v in runs.items()}, COLORS[arm], f"{LABELS[arm]} k-NN")
            _band(ax, {seed: v["linear_probe"] for seed, v in runs.items()}, COLORS[arm],
                  f"{LABELS[arm]} linear probe", ls="--")
        styles = {"random_init": ("grey", "random init"), "pixels": ("black", "raw pixels"),
                  "teacher": ("tab:red", "v2's teacher")}
        for name, scores in summary.get("representation_baselines", {}).items():
            color, label = styles[name]
            ax.axhline(scores["knn_top1"], color=color, ls=":", lw=1.2, label=f"{label} k-NN")
        ax.set_title("frozen features during pretraining (train.representation)", fontsize=10)
        ax.set_xlabel("pretraining step")
        ax.set_ylabel("validation top-1 (359 digits)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)  # beside: no curve hidden
    fig.suptitle("tiny BEiT on digits: MIM-pretrained vs from scratch, same fine-tuning (mean +- std over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_to_mlflow(out: Path, args: argparse.Namespace, summary: dict[str, Any], files: list[Path]) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    name = "mim_vs_scratch"
    experiment = client.get_experiment_by_name(name)
    experiment_id = (experiment.experiment_id if experiment is not None else
                     client.create_experiment(name, artifact_location=(out / "mlartifacts").resolve().as_uri()))
    run = client.create_run(experiment_id, run_name="summary" + ("_smoke" if args.smoke else ""))
    params = {"seeds": " ".join(map(str, args.seeds)), "label_fractions": " ".join(f"{f:g}" for f in args.label_fractions),
              "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
              "vocab_size": args.vocab_size, "mask_ratio": args.mask_ratio, "smoke": args.smoke, "v2": args.v2,
              "teacher_steps": args.teacher_steps, "v2_teacher": args.v2_teacher, "vqkd_steps": args.vqkd_steps, "knn_every": args.knn_every,
              "set_pretrain": " ".join(args.set_pretrain), "set_finetune": " ".join(args.set_finetune)}
    now = int(time.time() * 1000)
    metrics = []
    for row in summary["rows"]:
        key = f"val_top1_{row['arm']}_f{row['label_fraction']:g}"
        metrics += [Metric(f"{key}_mean", row["val_top1_mean"], now, 0), Metric(f"{key}_std", row["val_top1_std"], now, 0)]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    for file in files:
        client.log_artifact(run.info.run_id, str(file))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--label-fractions", type=float, nargs="+", default=[0.1, 1.0],
                        help="fractions of each class's training images whose labels the fine-tunes use")
    parser.add_argument("--out", type=Path, default=Path("runs/mim_vs_scratch"))
    parser.add_argument("--smoke", action="store_true",
                        help=f"a few steps of everything (default seeds: 0 only): {SMOKE}")
    parser.add_argument("--jobs", type=int, default=2, help="training runs side by side (one process each)")
    parser.add_argument("--pretrain-steps", type=int)
    parser.add_argument("--finetune-steps", type=int)
    parser.add_argument("--eval-every", type=int, help="evaluate every N steps (default: the recipes')")
    parser.add_argument("--vocab-size", type=int, default=64, help="codebook tokens (k-means centroids)")
    parser.add_argument("--kmeans-iters", type=int, default=20)
    parser.add_argument("--mask-ratio", type=float, default=0.4, help="fraction of the 16 patches masked in MIM")
    parser.add_argument("--set-pretrain", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for the pretraining runs")
    parser.add_argument("--set-finetune", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every fine-tuning arm (and v2's teacher)")
    parser.add_argument("--v2", action="store_true", help="add the BEiT v2 arm (teacher, VQ-KD tokenizer, v2 pretraining)")
    parser.add_argument("--teacher-steps", type=int, default=900, help="v2: steps of the teacher (all labels)")
    parser.add_argument("--v2-teacher", choices=["supervised", "mim"], default="supervised",
                        help="v2: distil the VQ-KD tokenizer from a model trained on all labels (default), or, "
                             "with no labels anywhere before fine-tuning, from the first seed's v1 pretraining")
    parser.add_argument("--vqkd-steps", type=int, help="v2: steps of the VQ-KD tokenizer (default: vqkd.yaml's)")
    parser.add_argument("--knn-every", type=int,
                        help="representation checks in every pretraining run every N steps (default: at every "
                             "pretraining evaluation; 0: off)")
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv
    if args.smoke:
        if "--seeds" not in given:
            args.seeds = [0]
        if "--teacher-steps" not in given:
            args.teacher_steps = SMOKE["teacher_steps"]
        args.vqkd_steps = args.vqkd_steps or SMOKE["vqkd_steps"]
        args.pretrain_steps = args.pretrain_steps or SMOKE["pretrain_steps"]
        args.finetune_steps = args.finetune_steps or SMOKE["finetune_steps"]
        args.eval_every = args.eval_every or SMOKE["eval_every"]
        args.vocab_size, args.kmeans_iters = SMOKE["vocab_size"], SMOKE["kmeans_iters"]
    import yaml

    args.pretrain_steps = args.pretrain_steps or yaml.safe_load(PRETRAIN_RECIPE.read_text())["train"]["steps"]
    args.finetune_steps = args.finetune_steps or yaml.safe_load(FINETUNE_RECIPE.read_text())["train"]["steps"]
    args.vqkd_steps = args.vqkd_steps or yaml.safe_load(VQKD_RECIPE.read_text())["train"]["steps"]
    if args.knn_every is None:  # every evaluation of the pretraining runs
        args.knn_every = args.eval_every or yaml.safe_load(PRETRAIN_RECIPE.read_text())["train"]["eval_every"]
    if not all(0 < f <= 1 for f in args.label_fractions):
        parser.error("--label-fractions: each must be in (0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    env = child_env(args.jobs)
    start = time.perf_counter()

    codebook = out / "codebook.safetensors"
    if not codebook.is_file():
        n = export_train_images(out / "train_images")
        seconds = beitdist(["tokenizer", "fit", "--images", str(out / "train_images"), "--out", str(codebook),
                            "--vocab-size", str(args.vocab_size), "--patch-size", str(PATCH_SIZE),
                            "--input-size", str(IMAGE_SIZE), "--iters", str(args.kmeans_iters), "--seed", "0"],
                           out / "tokenizer_fit.log", env)
        print(f"[tokenizer] {args.vocab_size}-token codebook on {n} training images: {seconds:.0f} s", flush=True)

    runs = plan_runs(args, runs_dir, codebook, out / "vqkd.safetensors")
    execute(runs, runs_dir, args.jobs, env)

    summary = summarize(runs, runs_dir, args)
    summary["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)  # this invocation
    summary["run_seconds_total"] = round(sum(r.seconds for r in runs), 1)  # every run, side by side or not
    table, data, picture = out / "results.md", out / "results.json", out / "curves.png"
    write_table(summary, args, table)
    data.write_text(json.dumps(summary, indent=1))
    plot(summary, args, picture)
    run_id = log_to_mlflow(out, args, summary, [table, data, picture])
    print(table.read_text())
    print(f"wrote {table}, {data}, {picture}; MLflow run {run_id} in sqlite:///{(out / 'mlflow.db').resolve()} "
          f"(experiment mim_vs_scratch); {summary['wall_seconds']:.0f} s in all (training processes: "
          f"{summary['run_seconds_total']:.0f} s, {args.jobs} at a time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
