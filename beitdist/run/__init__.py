"""A training run, one concern per module (light to import: nothing here imports torch at the top
of the package, so `beitdist.run.rundir` and `beitdist.run.files` stay cheap for the CLI, the
launcher and `output_paths`):

- `files`: `write_atomic` and the fsync helpers (a file replaced whole or not at all).
- `rundir`: `RunDir`, the one place that spells a run directory's layout.
- `checkpoints`: the engine-independent checkpoint directory (manifest, `latest`, commit, scan,
  resume point, prune, abandon) and the weights-only checkpoint file reader.
- `trainer`: the training loop on one rank (`beitdist.train.run` is its entry point).
- `evaluator`: evaluation over the validation loader, streamed, equal forwards on every rank.
- `checkpoint_writer`: save, commit and prune checkpoints; consolidate final weights.
- `ema`: the model EMA (`train.ema`), sharded like the parameters, saved in every checkpoint.
- `preemption`: SIGTERM as a request to stop after the current step with a checkpoint.
- `storage`: a run directory in an object store (`output_dir: s3://...`), staged on each node.
"""
