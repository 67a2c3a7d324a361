"""The training loop on one rank: set-up, resume, steps, progress, the result. Evaluation is
`beitdist.run.evaluator`, checkpoint saving and the final consolidation
`beitdist.run.checkpoint_writer`, the run directory's layout `beitdist.run.rundir`. The entry point
is `beitdist.train.run` (see beitdist/train.py for what the loop guarantees about randomness).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

from beitdist import plugins
from beitdist.checkpoint import CheckpointError, load_model
from beitdist.data.pipeline import build_loaders
from beitdist.distributed import DistInfo, apply_matmul_precision, device_for
from beitdist.engines import check_engine_available, create_engine, init_distributed
from beitdist.errors import RunFailedError
from beitdist.events import TrainContext
from beitdist.freeze import freeze
from beitdist.model import BeitForTask, ModelOutput, build_model
from beitdist.optim import Schedule, apply_schedule, param_groups
from beitdist.plan import forward_flops, peak_flops
from beitdist.recipe import Recipe
from beitdist.run import checkpoints as ckpts
from beitdist.run import preemption
from beitdist.run.checkpoint_writer import CheckpointWriter
from beitdist.run.collectives import all_gathered, all_reduced
from beitdist.run.ema import ModelEma
from beitdist.run.evaluator import Evaluator, sample_of
from beitdist.run.files import write_atomic
from beitdist.run.rundir import RunDir
from beitdist.run.storage import RemoteRun

log = logging.getLogger("beitdist.train")  # the name users know the loop's log lines by

Reporter = Callable[[dict[str, Any], "Path | None"], None]
DrainProbe = Callable[[], "str | None"]
DRAIN_PROBE_EVERY = 10
"""Steps between two questions to the drain probe. Ray's answer is a barrier over the workers
(every worker asks as often), and a drain notice comes tens of seconds to minutes ahead."""


class PreemptedError(RunFailedError):
    """SIGTERM (pre-emption) stopped the run at a step boundary, after a checkpoint of that step;
    launching it again resumes there. Every rank raises it at the same step. Exit code 143, the
    shell's code for a process ended by SIGTERM: a job scheduler must not take it for success."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=128 + 15)


class NonFiniteLossError(RunFailedError):
    """Too many consecutive non-finite losses (every rank sees the same reduced losses); the last
    good checkpoint is kept."""


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    losses: list[float] = field(default_factory=list)
    final_dir: Path | None = None
    checkpoint: Path | None = None


def _seed_everything(seed: int, step: int, rank: int) -> None:
    mixed = (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**31 - 1)
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


class Trainer:
    """Holds the pieces of one run on one rank; `run()` drives it."""

    def __init__(self, recipe: Recipe, dist_info: DistInfo, reporter: Reporter | None = None,
                 drain_probe: DrainProbe | None = None) -> None:
        self.recipe = recipe
        self.dist_info = dist_info
        self.reporter = reporter
        self.drain_probe = drain_probe
        """Asked every DRAIN_PROBE_EVERY steps, on every rank alike: why a node of this run is about
        to be taken away (Ray's node drain), or None."""
        self._drain_saved = False
        self.run_dir = recipe.run_dir
        self.layout = RunDir(self.run_dir)
        self.ckpt_dir = self.layout.checkpoints
        self.losses: list[float] = []
        self.eval_history: list[dict[str, float]] = []  # every evaluation of the run, kept across resumes
        self._events: dict[str, Any] = {}
        """The last evaluation's and checkpoint's step (and path), and where this attempt resumed,
        for the progress file (the launch's console prints a line for each)."""
        # wall-clock marks (epoch seconds) and the seconds of each loop iteration of this attempt
        # without its evaluation and checkpoint: start-up vs per-step framework overhead
        # (benchmarks/launch_overhead.py, benchmarks/zero_scaling.py)
        self.timing: dict[str, Any] = {"started_at": time.time(), "iteration_s": [], "data_s": []}
        self._stop_requested = False
        """Some rank got SIGTERM: every rank stops after this step (agreed in `_all_finite`)."""

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        recipe = self.recipe
        check_engine_available(recipe.engine)  # before joining the group: one clear line, no hang
        init_distributed(self.dist_info, recipe.engine.backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.recipe = recipe = recipe.at_world_size(self.world)  # grad_accum for a pinned global batch
        if self.rank == 0 and recipe.scaling.global_batch_size:
            log.info("global batch %d = %d per rank x %d accumulation x %d ranks", recipe.global_batch,
                     recipe.data.batch_size, recipe.engine.grad_accum, self.world)
        self.device = device_for(self.dist_info)
        apply_matmul_precision(recipe.engine)
        _seed_everything(recipe.seed, 0, self.rank)
        self.engine = create_engine(recipe.engine, recipe.optim, recipe.data.batch_size, self.world, self.device)
        backbone = recipe.model.backbone_config()
        if recipe.engine.activation_checkpointing and recipe.engine.backend == "deepspeed":
            backbone = backbone.replace(grad_checkpointing=True)  # fairscale wraps blocks in checkpoint_wrapper
        self.tokenizer = None
        if recipe.tokenizer.name is not None:
            tok_cls = plugins.tokenizer_class(recipe.tokenizer.name)
            self.tokenizer = tok_cls(recipe.tokenizer.options).to(self.device).eval()
        self.train_loader, self.val_loader = build_loaders(
            recipe.data, recipe.head.name, backbone.image_size[0], backbone.patch_size,  # batches as the head declares
            rank=self.rank, world_size=self.world, seed=recipe.seed,
            tokenizer_input_size=getattr(self.tokenizer, "input_size", None),
        )
        self.remote = self._remote_run()
        self.resume_tag = self._resume_tag()
        _seed_everything(recipe.seed, 0, rank=0)  # the same initial weights on every rank (ZeRO-3 shards them)
        with self.engine.model_construction():
            model = build_model(backbone, recipe.head.name, recipe.head.options)
        if recipe.model.init and self.resume_tag is None:
            self._init_weights(model)
        frozen = freeze(model, recipe.model.freeze)  # before the optimizer: no state, no weight decay for them
        if frozen:
            log.info("model.freeze: %d parameter tensors frozen (%s, ...)", len(frozen), frozen[0])
        self.engine.build(model, param_groups(model, recipe.optim))  # one group builder for every engine
        self.optimizer = self.engine.optimizer
        self.module = cast(BeitForTask, self.engine.module)
        self.schedule = Schedule(recipe.optim, recipe.train.steps)
        self.step, self.loader_state = 0, None
        # the average starts from the weights the run starts with (model.init's, or a resume's)
        self.ema = ModelEma(self.engine, recipe.train.ema.decay) if recipe.train.ema.enabled else None
        if self.resume_tag is not None:
            self._load(self.resume_tag)
        self.evaluator = Evaluator(self.engine, self.module, self.val_loader, self._prepare, self.device, self.rank,
                                   recipe.train.eval_mode)
        self.representation = None
        if recipe.train.representation.every:
            from beitdist.run.representation_check import RepresentationCheck

            self.representation = RepresentationCheck(self.engine, self.module, recipe, self.rank, self.world,
                                                      self.device)
        self.writer = CheckpointWriter(self.layout, self.engine, self.rank, recipe.train.keep_checkpoints, self.ema,
                                       self.remote, self.dist_info.local_rank)
        self.flops_per_image, self.peak_flops = self._flops(backbone)
        self.context = TrainContext(recipe.name, self.run_dir, self.rank, self.world, recipe, self.module,
                                    extras={"resumed_step": self.step, "gflops_per_image": (
                                        self.flops_per_image / 1e9 if self.flops_per_image else None)})
        self.timing.update(setup_done_at=time.time(), first_timed_step=self.step + 1)

    def _remote_run(self) -> RemoteRun | None:
        """An object-store output_dir: the first rank of each node downloads the resume point into
        its staging copy before any rank looks for one (`beitdist.run.storage`)."""
        url = self.recipe.run_url
        if url is None:
            return None
        remote = RemoteRun(url, self.run_dir, self.recipe.storage.options)
        if self.dist_info.local_rank == 0:
            remote.pull_resume_point()
        dist.barrier()
        return remote

    def _resume_tag(self) -> str | None:
        """The newest complete checkpoint, as the engine loads it (DeepSpeed converts one saved at
        another world size to a universal checkpoint). Newer checkpoints that are broken
        (truncated or missing files, deleted directory) are passed over with one warning that
        names them and why. Rank 0 decides for every rank, so ranks that see a shared file system
        at different moments cannot resume different steps."""
        point = ckpts.resume_point(self.ckpt_dir)
        if self.rank == 0 and point.warning() is not None:
            log.warning("%s", point.warning())
        choice = [point.tag]
        dist.broadcast_object_list(choice, src=0)
        tag = choice[0]
        if tag is None:
            return None
        written_by, backend = ckpts.checkpoint_backend(self.layout.tag(tag)), self.recipe.engine.backend
        if written_by != backend:
            raise CheckpointError(
                f"{self.layout.tag(tag)}: written by the {written_by} engine, but engine.backend is {backend}; resume "
                f"with engine.backend: {written_by}, or start a new run (another name or output_dir) with "
                f"model.init: {self.run_dir} (its consolidated weights)")
        # each node converts its own staging copy when the run lives in an object store
        converter = self.rank == 0 if self.remote is None else self.dist_info.local_rank == 0
        return self.engine.resume_tag(self.ckpt_dir, tag, ckpts.saved_world_size(self.layout.tag(tag)), converter)

    def _init_weights(self, model: BeitForTask) -> None:
        recipe = self.recipe
        state: dict[str, torch.Tensor] = {}
        if self.rank == 0:
            assert recipe.model.init is not None  # called for model.init only
            source = load_model(recipe.model.init, recipe.head.name, head_options=recipe.head.options,
                                trust_pickle=recipe.model.trust_pickle, **recipe.model.backbone_config().to_dict())
            state = source.state_dict()
            log.info("initialised weights from %s", recipe.model.init)
        self.engine.load_weights(model, state)

    def _load(self, tag: str) -> None:
        """Engine state (model, optimizer) from checkpoint `tag`, then the loop's own state."""
        self.engine.load(self.ckpt_dir, tag)
        if self.ema is not None:
            self._load_ema(tag)
        state = json.loads(self.layout.state_file(tag).read_text())
        self.step, self.loader_state = state["step"], state["loader"]
        self.eval_history = list(state.get("eval_history", []))
        log.info("resumed from %s at step %d", tag, self.step)
        self._events["resumed"] = f"{tag} at step {self.step}"  # the launch's console says it too

    def _load_ema(self, tag: str) -> None:
        tag_dir = self.layout.tag(tag.removesuffix("_universal"))  # the average is in the original checkpoint
        assert self.ema is not None
        if self.ema.load(tag_dir):
            return
        self.ema.restart()
        if self.rank == 0:
            log.warning("%s holds no model EMA (saved without train.ema): the average starts from its weights",
                        tag_dir)

    # ------------------------------------------------------------------- data
    def _flops(self, backbone: Any) -> tuple[int | None, float | None]:
        """Rank 0: one image's forward FLOPs (for achieved TFLOP/s) and this GPU's peak (for MFU)."""
        if self.rank != 0:
            return None, None
        try:
            flops = forward_flops(backbone, self.recipe.head.name, self.recipe.head.options)
        except Exception as err:  # a head the meta device cannot run: no throughput in FLOPs, nothing else lost
            log.info("model FLOPs not counted (%s: %s)", type(err).__name__, err)
            return None, None
        peak = None
        if self.device.type == "cuda":
            peak = peak_flops(torch.cuda.get_device_name(self.device), self.recipe.engine.precision)
        return flops, peak

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches forever; the loader moves to the next epoch after each full pass and
        counts what it delivered, so its state_dict() is exactly where a resumed run continues."""
        if self.loader_state is not None:
            self.train_loader.load_state_dict(self.loader_state)
        while True:
            yield from self.train_loader

    def _prepare(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if self.tokenizer is not None and "tokenizer_pixels" in batch:
            with torch.no_grad():
                batch["labels"] = self.tokenizer.encode(batch["tokenizer_pixels"])
        return batch

    def _forward(self, batch: Mapping[str, torch.Tensor]) -> ModelOutput:
        return self.engine.forward(batch["pixel_values"], batch.get("bool_masked_pos"))

    # ------------------------------------------------------------------- loop
    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank; the same all-reduce also tells every rank
        whether any was asked to stop (SIGTERM, `beitdist.run.preemption`), so they agree on the
        step to stop after without a collective of its own."""
        # on the loss's device: an NCCL group has no CPU collectives
        finite = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
        flags = torch.cat([finite, finite.new_tensor([0.0 if preemption.requested() else 1.0])])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        if flags[1].item() == 0.0:
            self._stop_requested = True
        return bool(flags[0].item())

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches. A micro-batch whose loss is not
        finite on any rank is dropped (no backward, no engine step) and replaced by the next."""
        _seed_everything(self.recipe.seed, self.step, self.rank)
        accum = self.recipe.engine.grad_accum
        done, bad, losses, images, start = 0, 0, [], 0, time.perf_counter()
        grad_norm, data_s = None, 0.0
        while done < accum:
            fetch_start = time.perf_counter()
            batch = self._prepare(next(batches))
            data_s += time.perf_counter() - fetch_start
            if self.rank == 0 and "sample_batch" not in self.context.extras:
                self.context.extras["sample_batch"] = sample_of(batch)
            out = self._forward(batch)
            loss = self.module.loss(out, batch)
            if not self._all_finite(loss):
                bad += 1
                log.warning("step %d: non-finite loss (%s) skipped (%d in a row)", self.step, loss.item(), bad)
                if bad >= self.recipe.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{bad} consecutive non-finite losses at step {self.step}; stopping. The last good "
                        f"checkpoint is kept in {self.ckpt_dir} (lower optim.lr or check the data)"
                    )
                continue
            self.engine.backward(loss)
            if done == accum - 1:
                lr = apply_schedule(self.optimizer, self.schedule, self.step)
            norm = self.engine.step()  # the optimizer steps at the last micro-batch
            if norm is not None:
                grad_norm = norm
            losses.append(loss.item())
            images += batch["pixel_values"].shape[0]
            done += 1
        self.step += 1
        if self.ema is not None:
            self.ema.update()
        loss_value = float(np.mean(losses))
        self.losses.append(loss_value)
        # data_s: what the step waited for its input (loading, augmentation, copy to the device, and
        # the tokenizer for MIM): near zero when the loader keeps up, the first thing to look at when not
        metrics = {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                   "images_per_s": images / (time.perf_counter() - start), "data_s": data_s}
        if self.flops_per_image:  # forward + backward ~ 3 forwards (activation recomputation not counted)
            achieved = 3 * self.flops_per_image * metrics["images_per_s"]
            metrics["tflops_per_rank"] = achieved / 1e12
            if self.peak_flops:
                metrics["mfu"] = achieved / self.peak_flops
        if self.device.type == "cuda":
            # this rank's peak so far (allocated by tensors, not the allocator's cache): what
            # `beitdist plan` predicts, and what decides the batch size a GPU can hold
            metrics["device_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 1024**3
        return metrics

    def evaluate(self) -> dict[str, float]:
        metrics = self.evaluator.evaluate()
        if self.representation is not None and self.representation.due(self.step):
            metrics.update(self.representation.measure())
        if self.ema is not None and self.recipe.train.ema.evaluate:
            with self.ema.swapped_in():
                averaged = self.evaluator.evaluate()
            metrics.update({f"val_ema_{k.removeprefix('val_')}": v for k, v in averaged.items()})
        sample = self.evaluator.sample
        # pictures of validation examples when they are what the model takes (a sliding-window
        # evaluation feeds larger images): true labels, no mixup; else the training examples stay
        if self.rank == 0 and sample is not None and tuple(sample["pixel_values"].shape[-2:]) == tuple(
                self.module.config.image_size):
            self.context.extras["sample_batch"] = sample
        return metrics

    def save(self, metrics: Mapping[str, float]) -> Path:
        """Checkpoint step_N with the loop's state beside the engine's (`CheckpointWriter.save`)."""
        def loop_state() -> dict[str, Any]:
            return {"step": self.step, "loader": self.train_loader.state_dict(), "metrics": dict(metrics),
                    "eval_history": self.eval_history, "recipe": self.recipe.to_record()}

        return self.writer.save(self.step, loop_state, self.context)

    def _finished_result(self) -> TrainResult | None:
        """A run resumed at its last step has nothing left to do: launching it again must not
        overwrite its result (metrics, final weights) with an empty one. Returns the saved result
        then (None when there are steps left)."""
        result_file = self.layout.result_file
        if self.step < self.recipe.train.steps or not result_file.exists():
            return None
        if self.rank == 0:
            log.info("run %s already finished at step %d; nothing to do (its result is kept)", self.recipe.name,
                     self.step)
        dist.barrier()
        return _result_from(result_file)

    def _write_progress(self, step_metrics: Mapping[str, float], eval_metrics: Mapping[str, float],
                        force: bool = False) -> None:
        """Rank 0, at most once a second (and after each evaluation and checkpoint): what the
        launcher's progress bar shows, and the events it prints a line for."""
        now = time.monotonic()
        if self.rank != 0 or (not force and now - getattr(self, "_progress_at", 0.0) < 1.0
                              and self.step < self.recipe.train.steps):
            return
        if not hasattr(self, "_started"):
            self._started, self._start_step = now, self.step - 1
        done = max(self.step - self._start_step, 1)
        eta = (now - self._started) / done * (self.recipe.train.steps - self.step)
        progress = {"step": self.step, "steps": self.recipe.train.steps, "loss": step_metrics["loss"],
                    "images_per_s": step_metrics["images_per_s"], "eta_s": eta, **eval_metrics,
                    **self._events}
        self._progress_at = now
        try:  # what a progress bar shows is not worth a run: a full disk is reported by the next save
            self.run_dir.mkdir(parents=True, exist_ok=True)  # before the first checkpoint it may not exist yet
            write_atomic(self.layout.progress_file, json.dumps(progress), durable=False)
        except OSError as err:
            log.debug("could not write %s: %s", self.layout.progress_file, err)

    def run(self) -> TrainResult:
        self.setup()
        finished = self._finished_result()
        if finished is not None:
            return finished
        plugins.emit("beitdist_on_train_start", context=self.context)
        try:
            with preemption.training():
                return self._train()
        except BaseException as err:
            self._report_failure(err)
            raise

    def _node_draining(self) -> bool:
        """Once per run: whether the drain probe (asked every DRAIN_PROBE_EVERY steps) reports a
        node about to go."""
        if self.drain_probe is None or self._drain_saved or self.step % DRAIN_PROBE_EVERY:
            return False
        reason = self.drain_probe()
        if reason is None:
            return False
        self._drain_saved = True
        if self.rank == 0:
            log.warning("%s: checkpointing step %d now (the restart after the node is gone resumes there)", reason,
                        self.step)
        return True

    def _checkpoint_now(self, step_metrics: Mapping[str, float], metrics: Mapping[str, float]) -> Path:
        """Checkpoint this step, tell Ray about it, and have the console say so."""
        checkpoint = self.save({**step_metrics, **metrics})
        if self.reporter is not None:
            self.reporter({"step": self.step, **step_metrics, **metrics}, checkpoint)
        self._events.update(checkpoint_step=self.step, checkpoint=str(checkpoint))
        return checkpoint

    def _stop_preempted(self, saved: bool, step_metrics: dict[str, float], metrics: dict[str, float],
                        checkpoint: Path | None) -> Path:
        """Every rank, after the step they agreed on: checkpoint it (unless this step saved one
        already), then end with PreemptedError."""
        if not saved:
            checkpoint = self._checkpoint_now(step_metrics, metrics)
        assert checkpoint is not None
        self._events["preempted_step"] = self.step
        self._write_progress(step_metrics, metrics, force=True)
        raise PreemptedError(f"stopped after step {self.step} on SIGTERM (pre-emption); checkpoint {checkpoint.name} is "
                             f"saved in {self.ckpt_dir}; launch the same recipe again to resume from it")

    def _record_device_peaks(self) -> None:
        """Every rank's peak GPU memory (bytes allocated) up to here, in `timing` of
        train_result.json: its evaluations and checkpoint saves are in it, the consolidation after
        it is not. Ranks differ (ZeRO partitions are uneven, rank 0 holds more), so all are kept."""
        if self.device.type != "cuda":
            return
        peaks = all_gathered(float(torch.cuda.max_memory_allocated(self.device)), self.device, self.world)
        self.timing["device_peak_bytes"] = [int(p) for p in peaks]

    def _report_failure(self, error: BaseException) -> None:
        """`beitdist_on_train_failed` (callbacks write what they buffered), without letting a
        failing callback hide the error that stopped training."""
        try:
            plugins.emit("beitdist_on_train_failed", context=self.context, step=self.step, error=error)
        except Exception:
            log.exception("a beitdist_on_train_failed callback failed; the training error follows")

    def _train(self) -> TrainResult:
        train = self.recipe.train
        batches = self._batches()
        metrics: dict[str, float] = {}
        checkpoint = None
        if self.step >= train.steps and self.resume_tag is not None:
            # resumed from the last step's checkpoint of a run that stopped before writing its
            # result: evaluate and consolidate that checkpoint instead of training
            checkpoint = self.layout.tag(self.resume_tag.removesuffix("_universal"))
            metrics = self.evaluate()
        while self.step < train.steps:
            iteration_start = time.perf_counter()
            step_metrics = self.train_step(batches)
            if "first_step_done_at" not in self.timing:
                self.timing["first_step_done_at"] = time.time()
            plugins.emit("beitdist_on_step_end", context=self.context, step=self.step, metrics=step_metrics)
            self._write_progress(step_metrics, metrics)
            if self.rank == 0 and train.log_every and self.step % train.log_every == 0:
                log.info("step %d/%d loss %.4f lr %.2e %.1f img/s", self.step, train.steps, step_metrics["loss"],
                         step_metrics["lr"], step_metrics["images_per_s"])
            last = self.step == train.steps
            stopping = self.step == train.stop_at
            side_start = time.perf_counter()  # evaluation and checkpoints are not per-step overhead
            if last or (train.eval_every and self.step % train.eval_every == 0):
                metrics = self.evaluate()
                self.eval_history.append({"step": self.step, **metrics})
                if self.rank == 0:
                    log.info("step %d eval: %s", self.step, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
                plugins.emit("beitdist_on_eval_end", context=self.context, step=self.step, metrics=metrics)
                self._events["eval_step"] = self.step
            saving = last or stopping or (train.checkpoint_every and self.step % train.checkpoint_every == 0)
            if saving:
                checkpoint = self._checkpoint_now(step_metrics, metrics)
            if self.step in (self._events.get("eval_step"), self._events.get("checkpoint_step")):
                self._write_progress(step_metrics, metrics, force=True)
            if self._stop_requested:
                checkpoint = self._stop_preempted(bool(saving), step_metrics, metrics, checkpoint)
            if self._node_draining() and not saving:
                # a node goes soon: checkpoint this step and train on; when the node is gone Ray
                # Train restarts the worker group, which resumes here (not at the last periodic one)
                checkpoint = self._checkpoint_now(step_metrics, metrics)
                self._write_progress(step_metrics, metrics, force=True)
            side_s = time.perf_counter() - side_start
            if not saving and self.reporter is not None:
                # every evaluation reaches Ray (a sweep's scheduler compares trials on it)
                evaluated = self.step == self._events.get("eval_step")
                if evaluated or (train.log_every and self.step % train.log_every == 0):
                    self.reporter({"step": self.step, **step_metrics, **(metrics if evaluated else {})}, None)
            self.timing["iteration_s"].append(time.perf_counter() - iteration_start - side_s)
            self.timing["data_s"].append(step_metrics["data_s"])
            if stopping and not last:
                log.info("stopping at step %d as asked (train.stop_at); the next launch resumes here", self.step)
                dist.barrier()
                return TrainResult(self.step, metrics, self.losses, None, checkpoint)
        self._record_device_peaks()
        # every rank takes part, before rank 0's consolidation alone (which may fail)
        skipped = int(all_reduced(torch.tensor([self.train_loader.corrupt_skipped]), self.device).item())
        final_dir = None
        if self.rank == 0 and checkpoint is not None:
            final_dir = self.writer.consolidate(checkpoint.name, self.recipe)
        result = TrainResult(self.step, metrics, self.losses, final_dir, checkpoint)
        if self.rank == 0:
            summary = {"step": result.step, "metrics": result.metrics, "losses": result.losses,
                       "eval_history": self.eval_history, "final_dir": str(final_dir) if final_dir else None,
                       "world_size": self.world,
                       "images_per_step": self.recipe.data.batch_size * self.recipe.engine.grad_accum * self.world,
                       "timing": self.timing, "corrupt_skipped": skipped,
                       "final_weights": self.writer.final_weights(self.recipe) if final_dir else None}
            write_atomic(self.layout.result_file, json.dumps(summary, indent=1))
            if self.remote is not None:
                self.remote.upload_file(self.layout.result_file)
        plugins.emit("beitdist_on_train_end", context=self.context, step=self.step, metrics=metrics,
                     final_dir=str(final_dir) if final_dir else None)
        if self.remote is not None and self.rank == 0:  # the MLflow run as the callbacks left it
            self.remote.push_run_files()
        dist.barrier()
        return result


def _result_from(path: Path) -> TrainResult:
    saved = json.loads(path.read_text())
    final_dir = Path(saved["final_dir"]) if saved.get("final_dir") else None
    return TrainResult(int(saved["step"]), dict(saved.get("metrics") or {}), list(saved.get("losses") or []), final_dir)


def run(recipe: Recipe, dist_info: DistInfo | None = None, reporter: Reporter | None = None,
        drain_probe: DrainProbe | None = None) -> TrainResult:
    """Train `recipe` on this rank (one process of a torchrun / Ray / plain run)."""
    return Trainer(recipe, dist_info or DistInfo.from_env(), reporter, drain_probe).run()
