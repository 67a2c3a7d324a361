"""`beitdist tune RECIPE --search SPEC`: the command line of a sweep."""

from __future__ import annotations

import argparse
import os
from typing import Any

from beitdist.errors import RunFailedError

EXIT_OK, EXIT_INTERRUPTED = 0, 130


def add_tune_cli(commands: Any) -> None:
    tune = commands.add_parser(
        "tune", help="sweep hyperparameters on Ray Tune: each trial a whole run, ASHA early stopping, MLflow",
        description="Sample the search space into trials (each checked against the recipe), reserve each "
        "trial's resources from the memory plan, run as many at once as the cluster fits on Ray Tune, stop bad "
        "trials early on the validation metric, and record the sweep in one MLflow parent run. Running the same "
        "command again resumes an interrupted sweep without repeating finished trials. See docs/tuning.md.")
    tune.add_argument("recipe", help="recipe YAML file (the base every trial changes)")
    tune.add_argument("--search", metavar="SPEC", help="the sweep file: `search:` (recipe keys -> distributions) "
                      "and optionally trials, scheduler, metric, mode, grace_period")
    tune.add_argument("--trials", type=int, help="samples of the space (times every grid point; default 4)")
    tune.add_argument("--scheduler", choices=("asha", "none"), help="early stopping (default asha)")
    tune.add_argument("--max-concurrent", type=int, metavar="K", help="at most K trials at once "
                      "(default: as many as the cluster fits)")
    tune.add_argument("--metric", help="the validation metric trials are compared on (default val_loss)")
    tune.add_argument("--mode", choices=("min", "max"), help="default: min for *loss, else max")
    tune.add_argument("--grace-period", type=int, metavar="STEPS",
                      help="steps before ASHA may stop a trial (default train.eval_every)")
    tune.add_argument("--name", help="the sweep's directory under output_dir (default <recipe name>_tune)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    tune.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    tune.add_argument("--dry-run", action="store_true",
                      help="print the trials, their resources and how many run at once, and exit")
    tune.set_defaults(run=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from beitdist.launcher import init_ray, uses_gpu, worker_env
    from beitdist.preflight import preflight
    from beitdist.recipe import with_environment
    from beitdist.recipe_cli import validate_file
    from beitdist.sweep.packing import cluster_nodes
    from beitdist.sweep.runner import check_sweep, describe_outcomes, local_cluster, prepare, run_sweep
    from beitdist.sweep.spec import SweepError, load_spec

    flags = {"trials": args.trials, "scheduler": args.scheduler, "max_concurrent": args.max_concurrent,
             "metric": args.metric, "mode": args.mode, "grace_period": args.grace_period, "name": args.name}
    if args.search is None:
        raise SweepError("--search: name the sweep file (recipe keys -> distributions, see docs/tuning.md)")
    spec = load_spec(args.search, flags)
    recipe = with_environment(validate_file(args.recipe, args.set, check_paths=not args.dry_run))
    address = args.address or os.environ.get("RAY_ADDRESS")
    gpu = None if address and recipe.scaling.use_gpu == "auto" else uses_gpu(recipe)
    preflight(recipe, this_machine=not args.dry_run, gpu=gpu)
    checked = check_sweep(recipe, spec, args.recipe)  # a bad search space is one line before Ray starts
    if args.dry_run and not address:
        nodes = None  # this machine, as a local Ray instance would see it; nothing is started
    else:
        from beitdist.extras import require

        require("ray", "beitdist tune")
        if address:
            init_ray(address, None, worker_env(1, args.verbose), args.verbose)
            nodes = cluster_nodes()
        else:
            nodes = local_cluster(None, args.verbose)
    use_gpu = uses_gpu(recipe, sum(n.get("GPU", 0.0) for n in nodes) if address and nodes else None)
    plan = prepare(checked, args.recipe, nodes, use_gpu)
    print(plan.describe())
    if args.dry_run:
        return EXIT_OK
    summary = run_sweep(plan, verbose=args.verbose)
    print(describe_outcomes(summary))
    if summary["interrupted"]:
        print(f"sweep {plan.spec.name} interrupted: run the same command again to resume it")
        return EXIT_INTERRUPTED
    if summary["best"] is None:
        raise RunFailedError(f"sweep {plan.spec.name}: no trial finished with {plan.spec.metric}; see "
                             f"{plan.sweep_dir / 'sweep_result.json'} and the trials' logs")
    return EXIT_OK
