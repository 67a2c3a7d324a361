"""DeepSpeed behind the TrainEngine interface: every line of beitdist that imports DeepSpeed, or
knows its config, files or workarounds, is in this package.

- `engine`: the DeepSpeedEngine (ZeRO 0-3, offload, compile, universal-checkpoint resume).
- `config`: DeepSpeed's config dict from the recipe (no DeepSpeed import; `beitdist plan` uses it).
- `comm`: joining the process group through DeepSpeed's communication layer.
- `zero`: ZeRO-3 model construction (`zero.Init`) and loading full weights into partitions.
- `optim`: the client optimizer (beitdist's AdamW, or DeepSpeed's CPU Adam under offload).
- `checkpoints`: consolidation of ZeRO shards (weights-only unpickling) and universal conversion.
- `importing`: `import_deepspeed`, the one way beitdist imports DeepSpeed (without its mlflow and
  inductor side imports).
- `shm`: releasing the /dev/shm buffer DeepSpeed's CPU allreduce never unlinks.

Importing this package imports nothing from DeepSpeed: each module imports it where it is used,
through `import_deepspeed`, so `import beitdist` (and a fairscale run) never pays for it.
"""
