"""`beitdist tune`: hyperparameter sweeps of whole beitdist runs on Ray Tune.

- `spec`: the sweep file (search space, trials, scheduler, metric), parsed like a recipe.
- `space`: the search space's distributions, sampled up front (seeded) into concrete trials, each
  one checked against the recipe schema before anything starts.
- `packing`: each trial's Ray resources from the memory plan, and how many trials fit at once.
- `runner`: the Tune experiment (one Ray Train run per trial, ASHA on the validation metric,
  restore after a Ctrl-C or a crashed driver).
- `record`: the sweep's MLflow parent run, its picture and `sweep_result.json`.
"""
