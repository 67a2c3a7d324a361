"""BEiT's pretraining step (masked image modeling) of beitdist against transformers', side by side
in one process.

The backbone is set up as BEiT's pretraining has it (one relative-position table shared by all
blocks, layer scale 0.1, stochastic depth `--drop-path`, 0.1 by default). Step = forward with
the blockwise mask (BEiT's: 75 of 196 patches at 224 px, blocks of at least
16), cross-entropy over the visual-token vocabulary (8192, the DALL-E dVAE's) on the masked
patches only, backward, and torch's fused AdamW (the same optimizer for both). Models:
beitdist's backbone + MIM head, and transformers' `BeitForMaskedImageModeling` with
attn_implementation "sdpa" holding the same weights (exported with `beitdist.export_hf`). Both
compute the same loss; they differ in where `lm_head` runs: beitdist projects only the masked
patches in training (as unilm's pretraining), transformers projects all of them and selects the
masked ones for the loss. The targets are random token ids (the tokenizer is not part of the
step). Every model gets the same batch, mask and targets; steps are interleaved model by model
and the median time is reported. `--check` also compares the two losses on the first batch (with
`--drop-path 0`: the libraries draw stochastic depth differently).

    python benchmarks/mim_pretrain_step.py                         # BEiT-B, batch 8, fp32
    python benchmarks/mim_pretrain_step.py --variant small --dtype bf16 --iters 3
    python benchmarks/mim_pretrain_step.py --device cuda --batch 64 --dtype bf16 --iters 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from backbone_throughput import device_name, optimizer_step, resolve_device, synchronize

import beitdist
from beitdist.data.masking import MaskingGenerator

VOCAB = 8192


def batch_of(args: argparse.Namespace, config: beitdist.BackboneConfig) -> dict[str, torch.Tensor]:
    """Pixels, BEiT's blockwise masks scaled to the grid, and random target tokens."""
    grid = config.image_size[0] // config.patch_size
    masks = MaskingGenerator.for_grid(grid, seed=0)
    mask = torch.from_numpy(np.stack([masks().reshape(-1) for _ in range(args.batch)]))
    return {"pixel_values": torch.randn(args.batch, 3, *config.image_size, device=args.device),
            "bool_masked_pos": mask.to(args.device),
            "labels": torch.randint(0, VOCAB, mask.shape, device=args.device)}


def build_models(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, torch.nn.Module], beitdist.BackboneConfig]:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = beitdist.variant(args.variant, image_size=args.image_size, rel_pos_bias="shared",
                              drop_path_rate=args.drop_path)
    ours = beitdist.build_model(config, "mim", {"vocab_size": VOCAB})
    beitdist.export_hf(ours, workdir, overwrite=True)
    theirs = transformers.BeitForMaskedImageModeling.from_pretrained(workdir, attn_implementation="sdpa")
    return {"beitdist": ours.to(args.device), "transformers-sdpa": theirs.to(args.device)}, config


def loss_of(name: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The masked-token cross-entropy, as each library computes it in training."""
    mask = batch["bool_masked_pos"]
    if name == "beitdist":
        return model.head.loss(model(batch["pixel_values"], mask), batch)
    logits = model(pixel_values=batch["pixel_values"], bool_masked_pos=mask).logits
    return torch.nn.functional.cross_entropy(logits[mask].float(), batch["labels"][mask])


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        models, config = build_models(args, Path(tmp))
    batch = batch_of(args, config)
    for model in models.values():
        model.train()
    losses = {}
    if args.check:  # before any step changes the weights
        with torch.no_grad():
            losses = {name: float(loss_of(name, model, batch)) for name, model in models.items()}
    steps = {name: optimizer_step(model, lambda name=name, model=model: loss_of(name, model, batch), args.device,
                                  args.dtype == "bf16") for name, model in models.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.iters):
        for name, step in steps.items():
            synchronize(args.device)
            start = time.perf_counter()
            step()
            synchronize(args.device)
            times[name].append(time.perf_counter() - start)
    rows = [{"model": name, "images_per_s": args.batch / statistics.median(samples), "step_times_s": samples}
            for name, samples in times.items()]
    masked = int(batch["bool_masked_pos"].sum())
    return {"variant": args.variant, "dtype": args.dtype, "batch": args.batch, "image_size": args.image_size,
            "masked_patches_per_image": masked / args.batch, "patches_per_image": batch["bool_masked_pos"].shape[1],
            "device": device_name(args.device), "torch": torch.__version__, "rows": rows,
            "ratio": rows[0]["images_per_s"] / rows[1]["images_per_s"], "first_losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="base")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate (BEiT pretraining: 0.1)")
    parser.add_argument("--check", action="store_true", help="compare the two losses on the first batch")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/mim_pretrain_step.json"))
    args = parser.parse_args()
    args.device = resolve_device(args.device, parser)
    if args.check and args.drop_path:
        parser.error("--check compares the two losses: it needs --drop-path 0 (the libraries draw stochastic depth differently)")
    result = run(args)
    print(f"torch {result['torch']}, {result['device']}; BEiT-{args.variant} MIM step, batch {args.batch}, "
          f"{args.image_size} px, {args.dtype}, vocabulary {VOCAB}, {result['masked_patches_per_image']:.1f} of "
          f"{result['patches_per_image']} patches masked per image")
    for row in result["rows"]:
        print(f"  {row['model']:18} {row['images_per_s']:8.3f} img/s  (steps: "
              f"{', '.join(f'{t:.3f}' for t in row['step_times_s'])} s)")
    print(f"  -> beitdist / transformers-sdpa = {result['ratio']:.2f}x")
    if result["first_losses"]:
        print("  first-batch losses: " + ", ".join(f"{k} {v:.6f}" for k, v in result["first_losses"].items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
