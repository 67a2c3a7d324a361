"""Ray Train: a recipe becomes a TorchTrainer whose workers run `beitdist.train` with DeepSpeed.

Only a plain dict crosses the Ray boundary (`train_loop_config`); each worker parses it into a
Recipe again and resolves plugins by name in its own process. Runs live in
<output_dir>/<name>/ (the Ray storage path): re-launching the same name resumes from the newest
complete checkpoint there, and Ray's FailureConfig restarts a failed worker group, which resumes
the same way. Across nodes the output directory must be shared storage (NFS or similar).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from beitdist.console import ProgressBar
from beitdist.errors import InputError, RunFailedError
from beitdist.recipe import Recipe, parse_recipe
from beitdist.run.rundir import RunDir

log = logging.getLogger(__name__)


class LaunchError(InputError):
    """The launch cannot start (cluster unreachable, impossible scaling); nothing was started."""


@dataclass(frozen=True)
class LaunchPlan:
    world_size: int
    use_gpu: bool
    per_rank_batch: int
    grad_accum: int
    global_batch: int
    zero_stage: int
    steps: int
    params: int
    per_rank_gib: float
    host_gib: float
    device_gib: float | None = None
    """scaling.gpu_memory_gb: the memory of each worker's GPU, when the recipe states it."""
    fitting_setting: str | None = None
    """The least-sharded ZeRO / offload setting that fits `device_gib`, if any."""

    @property
    def checks_fit(self) -> bool:
        return self.use_gpu and self.device_gib is not None

    @property
    def fits(self) -> bool:
        return self.device_gib is None or not self.use_gpu or self.per_rank_gib <= self.device_gib

    def fit_problem(self) -> str | None:
        """Why the run would run out of GPU memory, in one line, or None."""
        if self.fits:
            return None
        hint = (f"the smallest setting that fits is {self.fitting_setting} (engine.zero_stage / offload)"
                if self.fitting_setting else "no ZeRO stage or offload fits: add workers, lower data.batch_size "
                "or turn on engine.activation_checkpointing")
        return (f"scaling.gpu_memory_gb: the plan needs ~{self.per_rank_gib:.1f} GiB per GPU, more than the "
                f"{self.device_gib:g} GiB stated; {hint}")

    def describe(self, recipe: Recipe) -> str:
        device = "GPU" if self.use_gpu else "CPU"
        lines = [
            f"run            {recipe.name} -> {recipe.run_dir}",
            f"model          {recipe.model.variant} backbone, head {recipe.head.name}, {self.params / 1e6:.1f}M parameters"
            + _trainable_note(self.params),
            f"workers        {self.world_size} x {device} (placement {recipe.scaling.placement_strategy})",
            f"batch          {self.per_rank_batch} per rank x {self.grad_accum} accumulation x "
            f"{self.world_size} ranks = {self.global_batch} global",
            f"engine         {_engine_name(recipe, self.zero_stage)}, {recipe.engine.precision}, {self.steps} steps",
            f"memory         ~{self.per_rank_gib:.1f} GiB per rank on the device, {self.host_gib:.1f} GiB host (offload)",
        ]
        if self.use_gpu:
            lines.append(f"needs          {self.world_size} GPUs with >= {self.per_rank_gib:.0f} GiB each")
        if self.checks_fit:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"fit            {verdict} in {self.device_gib:g} GiB per GPU (scaling.gpu_memory_gb)")
        return "\n".join(lines)


def _trainable_note(params: int) -> str:
    trainable = getattr(params, "trainable", params)
    return "" if trainable == params else f" ({trainable / 1e6:.2f}M trainable, the rest frozen by model.freeze)"


def _engine_name(recipe: Recipe, zero_stage: int) -> str:
    if recipe.engine.backend == "fairscale":
        return f"fairscale {recipe.engine.fairscale_mode} (memory like ZeRO-{zero_stage})"
    return f"DeepSpeed ZeRO-{zero_stage}"


def uses_gpu(recipe: Recipe, cluster_gpus: float | None = None) -> bool:
    """scaling.use_gpu resolved. "auto" means GPUs when the cluster has any (`cluster_gpus`, once
    connected to one: a CPU-only head node may drive a GPU cluster), else when this process sees
    CUDA."""
    use_gpu = recipe.scaling.use_gpu
    if use_gpu != "auto":
        return bool(use_gpu)
    if recipe.scaling.resources_per_worker.get("GPU") == 0:
        return False  # the recipe asks for workers without GPUs
    return cluster_gpus > 0 if cluster_gpus is not None else torch.cuda.is_available()


def make_plan(recipe: Recipe, use_gpu: bool) -> LaunchPlan:
    from beitdist.plan import GIB, activation_bytes, all_plans, count_parameters, plan, smallest_fit

    world = recipe.scaling.num_workers
    recipe = recipe.at_world_size(world)
    engine = recipe.engine.resolved()
    backbone = recipe.model.backbone_config()
    params = count_parameters(backbone, recipe.head.name, recipe.head.options, recipe.model.freeze)
    activations = activation_bytes(backbone, recipe.data.batch_size, recipe.engine.precision,
                                   recipe.engine.activation_checkpointing)
    memory = plan(params, world, engine["zero_stage"], recipe.engine.precision, engine["offload_optimizer"],
                  engine["offload_params"], activations, largest_layer=params.largest_layer)
    device_gib = recipe.scaling.gpu_memory_gb
    fitting = None
    if device_gib is not None:
        options = all_plans(params, world, recipe.engine.precision, activations, largest_layer=params.largest_layer)
        best = smallest_fit(options, device_gib * GIB)
        fitting = best.name if best is not None else None
    return LaunchPlan(world, use_gpu, recipe.data.batch_size, recipe.engine.grad_accum, recipe.global_batch,
                      engine["zero_stage"], recipe.train.steps, params, memory.device_total / GIB,
                      memory.cpu / GIB, device_gib, fitting)


def worker_config(recipe: Recipe, use_gpu: bool) -> dict[str, Any]:
    """What Ray Train hands each worker. Ray keeps `train_loop_config` in its state (the dashboard's
    Train view, exported events), so it holds the recipe as recorded (credentials redacted,
    `beitdist.credentials`); a recipe that carries credentials travels whole as an object in
    Ray's object store, which only the cluster's processes read."""
    import ray

    record = recipe.to_record()
    full = recipe.to_dict()
    return {"recipe": record, "use_gpu": use_gpu, "recipe_ref": ray.put(full) if record != full else None}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray worker: rebuild the recipe, train, report progress to Ray."""
    import ray.train

    from beitdist.distributed import DistInfo
    from beitdist.ray_worker_setup import verbose

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # the driver prints rank 0's progress, evaluations and checkpoints; the workers say only
    # warnings and errors unless the launch is verbose
    logging.getLogger("beitdist").setLevel(logging.INFO if verbose() else logging.WARNING)
    # DeepSpeed's accelerator must match the resources Ray gave this worker: set before anything
    # imports DeepSpeed, overriding a DS_ACCELERATOR the driver's environment passed down
    os.environ["DS_ACCELERATOR"] = "cuda" if config.get("use_gpu") else "cpu"
    context = ray.train.get_context()
    recipe = parse_recipe(ray.get(config["recipe_ref"]) if config.get("recipe_ref") else config["recipe"],
                          "recipe (sent to the worker)")
    dist_info = DistInfo(rank=context.get_world_rank(), world_size=context.get_world_size(),
                         local_rank=context.get_local_rank())

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if checkpoint is not None:
            clean["checkpoint_step"] = float(metrics.get("step", 0))
        ray.train.report(clean)

    _record_worker(recipe.run_dir, dist_info.rank)
    from beitdist.train import run  # after the record: its imports (DeepSpeed, data) count as set-up

    run(recipe, dist_info, reporter=report, drain_probe=ray_drain_probe)


def ray_drain_probe() -> str | None:
    """Ray Train's notice that a node of this worker group is being drained (a spot reclaim, an
    autoscaler scale-down): the nodes and the deadline, or None. A barrier over the workers."""
    import ray.train

    get_info = getattr(ray.train, "get_preemption_info", None)  # absent from older Ray releases
    info = get_info() if get_info is not None else None
    if info is None:
        return None
    deadline = (f", deadline in {max(info.deadline_ms / 1000 - time.time(), 0):.0f} s"
                if info.deadline_ms else "")
    return f"Ray is draining node(s) {', '.join(info.preempted_node_ids)} (ranks {info.preempted_ranks}{deadline})"


def _record_worker(run_dir: Path, rank: int) -> None:
    """`<run_dir>/workers/rank_<r>.json`: which Ray node, host and process run each rank, and from
    when. Rewritten by every attempt, so after a restart it says where the ranks run now: what an
    operator needs to find a rank's logs or to kill a stuck one."""
    import ray

    from beitdist.run.files import write_atomic

    context = ray.get_runtime_context()
    record = {"rank": rank, "node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
              "hostname": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    layout = RunDir(run_dir)
    layout.workers.mkdir(parents=True, exist_ok=True)
    write_atomic(layout.worker_record(rank), json.dumps(record))


def root_cause(error: BaseException) -> BaseException:
    """The exception a worker raised, out of Ray's wrappers (WorkerGroupError -> RayTaskError ->
    the user's exception); the error itself when nothing is wrapped."""
    failures = getattr(error, "worker_failures", None) or {}
    cause: BaseException = failures[min(failures)] if failures else error
    seen = set()
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException):
            break
        cause = inner
    return cause


def _checkpoint_note(recipe: Recipe) -> str:
    """What a stopped run leaves to resume from, for the one line the user reads."""
    from beitdist.run.checkpoints import complete_tags

    checkpoints = RunDir(recipe.run_dir).checkpoints
    tags = complete_tags(checkpoints, quiet=True)
    if not tags:
        return "no checkpoint was written"
    return f"the last complete checkpoint, {checkpoints / tags[0]}, is kept and launching the recipe again resumes from it"


def _run_failed(recipe: Recipe, error: BaseException, max_failures: int) -> RunFailedError:
    cause = root_cause(error)
    lines = [line for line in str(cause).splitlines() if line.strip()]
    what = f"{type(cause).__name__}: {lines[-1] if lines else ''}".strip()
    restarts = "no restarts allowed" if max_failures == 0 else f"after {max_failures} restarts" if max_failures > 0 \
        else "restarts unlimited"
    from beitdist.network import rendezvous_hint

    hint = rendezvous_hint(str(cause))
    if hint is not None:
        what = hint
    message = f"run {recipe.name!r} failed on its workers ({restarts}): {what}; {_checkpoint_note(recipe)}"
    return RunFailedError(message, exit_code=2 if isinstance(cause, InputError) else 1)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a cluster address nobody answers at (ray.init would retry for minutes)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(f"--address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise LaunchError(
            f"cannot connect to {address}: {err.strerror or err}; is a Ray head running there (`ray start --head`)?"
        ) from None


WORKER_SETUP_HOOK = "beitdist.ray_worker_setup.setup_worker"
"""Run first by every Ray worker process of the job (by its import path: importing beitdist's
public API would cost every Ray process seconds of torch import)."""


def _record_launch(run_dir: Path, record: dict[str, Any]) -> None:
    """`<run_dir>/launch.json`: when this launch started and when Ray was up (epoch seconds), so
    start-up time can be told apart from Ray's own (benchmarks/launch_overhead.py)."""
    from beitdist.run.files import write_atomic

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(RunDir(run_dir).launch_record, json.dumps(record), durable=False)


def checkout_pythonpath(search_path: list[str] | None = None) -> str | None:
    """PYTHONPATH for Ray's worker processes, unless beitdist lies in a folder on sys.path other
    than the working directory (an installed package). `python -m beitdist` in a clone that is not
    installed finds beitdist only through the working directory, and Ray starts its workers
    elsewhere: they could not import the training function, and the launch died in Ray's worker
    set-up with a traceback. For an editable install the path is the one its import hook points
    at anyway."""
    search_path = sys.path if search_path is None else search_path
    root = Path(__file__).resolve().parent.parent
    elsewhere = {Path(entry).resolve() for entry in search_path if entry} - {Path.cwd().resolve()}
    if root in elsewhere:
        return None
    return os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def init_ray(address: str | None, num_cpus: int | None, env_vars: dict[str, str], verbose: bool = False) -> None:
    import ray

    if address:
        check_reachable(address)
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": WORKER_SETUP_HOOK}
    try:
        # the driver's own Ray logger at WARNING: "Started a local Ray instance" and the like are not news
        level = logging.INFO if verbose else logging.WARNING
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=level)
        else:
            ray.init(num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False, log_to_driver=True,
                     logging_level=level)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as err:
        where = address or "a local Ray instance"
        raise LaunchError(f"cannot connect to {where}: {str(err).splitlines()[0]}") from None


def launch(recipe: Recipe, address: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run `recipe` on Ray (a local instance sized to this machine, or the cluster at `address`);
    returns the run's train_result.json. `verbose`: every Ray process logs at INFO (`-v`)."""
    started_at = time.time()
    scaling = recipe.scaling
    if recipe.run_url is None:
        recipe = recipe.replace(output_dir=str(Path(recipe.output_dir).resolve()))
    num_cpus = None if address else max(os.cpu_count() or 1, scaling.num_workers + 1)
    init_ray(address, num_cpus, worker_env(scaling.num_workers, verbose), verbose)
    use_gpu = uses_gpu(recipe, _cluster_gpus() if address else None)
    if address and use_gpu != uses_gpu(recipe):
        log.info("the cluster at %s %s GPUs: the workers train on %s (scaling.use_gpu: auto)", address,
                 "has" if use_gpu else "has no", "GPUs" if use_gpu else "CPUs")
    _record_launch(recipe.run_dir, {"started_at": started_at, "ray_ready_at": time.time(),
                                    "num_workers": scaling.num_workers, "address": address})
    return fit_on_ray(recipe, use_gpu, verbose)


def worker_env(num_workers: int, verbose: bool) -> dict[str, str]:
    """The environment Ray gives every worker: threads per worker, this checkout on the path."""
    from beitdist.ray_worker_setup import VERBOSE_ENV

    env_vars = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // num_workers))}
    if (pythonpath := checkout_pythonpath()) is not None:
        env_vars["PYTHONPATH"] = pythonpath
    if verbose:
        env_vars[VERBOSE_ENV] = "1"
    return env_vars


def fit_on_ray(recipe: Recipe, use_gpu: bool, verbose: bool = False, callbacks: list[Any] | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Train `recipe` (absolute output_dir) with Ray Train on the Ray instance this process is
    connected to; returns its train_result.json. `callbacks`: Ray Train callbacks (a sweep's
    reporting to Tune); `progress`: rank 0's progress bar on this process's terminal."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = recipe.scaling
    # Ray Train's own records go beside the run (its staging copy for an object-store output_dir)
    storage_path = recipe.run_dir.resolve().parent
    resources = dict(scaling.resources_per_worker or {"CPU": 1})
    if use_gpu:
        resources.setdefault("GPU", 1)  # Ray refuses use_gpu with no GPU in the worker's resources
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(recipe, use_gpu),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources, placement_strategy=scaling.placement_strategy),
        run_config=RunConfig(  # type: ignore[call-arg]  # Ray Train v2's RunConfig; mypy resolves v1's
            name=recipe.name, storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            # Ray Train's per-report dicts and set-up lines: the progress bar says it shorter
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            callbacks=callbacks or None),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    from ray.train import TrainingFailedError

    try:
        with ProgressBar(RunDir(recipe.run_dir).progress_file) if progress else contextlib.nullcontext():
            trainer.fit()
    except TrainingFailedError as err:
        raise _run_failed(recipe, err, scaling.max_failures) from None
    except SystemExit:
        # Ctrl-C during fit(): Ray Train's own SIGINT handler aborts the controller (the workers
        # stop), then the blocked ray.get() turns the interrupt into SystemExit(1)
        raise KeyboardInterrupt(_checkpoint_note(recipe)) from None
    result_file = RunDir(recipe.run_dir).result_file
    if not result_file.exists() and recipe.run_url is not None:  # rank 0 ran on another node
        from beitdist.run.storage import RemoteRun

        RemoteRun(recipe.run_url, recipe.run_dir, recipe.storage.options).pull_resume_point()
    if not result_file.exists():
        raise RuntimeError(f"the run finished without writing {result_file}")
    return json.loads(result_file.read_text())
