"""`pixel_regression`: masked pixel regression (SimMIM / MAE style pretraining) as a beitdist head.

What it does: the data pipeline masks BEiT-style blocks of patches (the backbone replaces them by
its mask token), the head predicts the pixels of every patch from the last block's tokens with a
light decoder, and the loss is the mean squared error on the masked patches only. With
`norm_pix` the target of each patch is its pixels normalised by the patch's own mean and
standard deviation (MAE's `norm_pix_loss`), which makes the task about structure, not brightness.

How it differs from beitdist's built-in heads:

- no labels and no visual tokenizer: `data_needs = DataNeeds(labels=None, mask=True)`, so its
  batches are "pixel_values" and "bool_masked_pos" only;
- the target is computed from the batch's own pixels, inside `loss`;
- `forward` returns pixels, (B, N, patch_size**2 * 3), one row per patch (row-major, like the
  backbone's patches), from either decoder: "linear" (LayerNorm + Linear per token, MAE's
  prediction layer) or "pixel_shuffle" (LayerNorm, a 1x1 convolution over the patch grid and a
  pixel shuffle, SimMIM's decoder);
- its metric is an error (lower is better): `pixel_mse` from sums that all-reduce, plus the count
  of masked patches scored (`masked_patches`, `mask_ratio`), which only a masked batch can give;
- its pictures show, per example, the input, the masked input and the reconstruction side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

import beitdist
from beitdist.heads import DataNeeds, KeyMap
from beitdist.schema import check

if TYPE_CHECKING:
    from PIL.Image import Image

    from beitdist import BackboneConfig, BeitForTask, ModelOutput

DECODERS = ("linear", "pixel_shuffle")


@dataclass(frozen=True)
class PixelRegressionOptions:
    norm_pix: bool = True
    """Regress each masked patch's pixels normalised by the patch's own mean and std (MAE's
    norm_pix_loss); False: the pixels as the data pipeline normalised them."""
    decoder: Literal["linear", "pixel_shuffle"] = "linear"
    """"linear": LayerNorm + Linear(embed_dim, patch_size**2 * 3) per token (MAE's prediction
    layer); "pixel_shuffle": LayerNorm, a 1x1 conv to patch_size**2 * 3 channels over the patch
    grid and PixelShuffle(patch_size) (SimMIM's decoder)."""

    def __post_init__(self) -> None:
        check(isinstance(self.norm_pix, bool), "norm_pix", f"expected true or false, got {self.norm_pix!r}")
        check(self.decoder in DECODERS, "decoder", f"expected one of {', '.join(DECODERS)}, got {self.decoder!r}")


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), patches row-major like the backbone's."""
    b, c, height, width = pixels.shape
    h, w = height // patch, width // patch
    x = pixels.reshape(b, c, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)  # B, h, w, p, p, C
    return x.reshape(b, h * w, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """The inverse of `patchify`: (B, N, patch * patch * C) -> (B, C, H, W) for a (rows, cols) grid."""
    b, (h, w) = patches.shape[0], grid
    x = patches.reshape(b, h, w, patch, patch, -1).permute(0, 5, 1, 3, 2, 4)  # B, C, h, p, w, p
    return x.reshape(b, -1, h * patch, w * patch)


def normalise_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch (last dim) minus its mean, over its std (MAE's norm_pix_loss target)."""
    mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


class PixelRegressionHead(beitdist.Head):
    """Predicts every patch's pixels from the tokens; scored on the masked patches (see the module doc)."""

    name = "pixel_regression"
    Options = PixelRegressionOptions
    needs = "tokens"
    pooling = ("none",)  # no final norm or pooler in the backbone: the head has its own norm
    uses_mask = True  # the backbone gets a mask token and replaces the masked patches' embeddings
    data_needs = DataNeeds(labels=None, mask=True)  # pixels and a blockwise mask: no labels, no tokenizer
    # SimMIM-style checkpoints (unilm / timm layout after the `encoder.` prefix): the decoder marks
    # the head; `norm` (the final norm) alone is a backbone's in other checkpoints, so it is no mark
    unilm_keys = KeyMap((("decoder", "head.decoder"), ("norm", "head.norm")), marks=("decoder",))

    def __init__(self, backbone: BackboneConfig, options: PixelRegressionOptions | None = None) -> None:
        super().__init__(backbone, options)
        self.patch, self.grid = backbone.patch_size, backbone.grid_size
        out = self.patch * self.patch * backbone.in_chans
        self.norm = nn.LayerNorm(backbone.embed_dim, eps=backbone.layer_norm_eps)
        if self.opts.decoder == "linear":
            self.decoder = nn.Linear(backbone.embed_dim, out)
        else:
            self.decoder = nn.Sequential(nn.Conv2d(backbone.embed_dim, out, kernel_size=1), nn.PixelShuffle(self.patch))

    def forward(self, features: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + N, D) tokens -> (B, N, patch**2 * 3) pixels of every patch (the CLS token is not used)."""
        x = self.norm(features[:, 1:])
        if self.opts.decoder == "linear":
            return self.decoder(x)
        b, _, d = x.shape
        grid = x.transpose(1, 2).reshape(b, d, *self.grid)  # (B, D, rows, cols)
        return patchify(self.decoder(grid), self.patch)  # (B, 3, H, W) -> patches

    def target(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What each patch's prediction is compared with: its pixels, normalised per patch with norm_pix."""
        patches = patchify(pixel_values.float(), self.patch)
        return normalise_patches(patches) if self.opts.norm_pix else patches

    def _masked(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions and targets of the masked patches, (M, patch**2 * 3) each."""
        mask = batch["bool_masked_pos"].bool()
        return output.logits.float()[mask], self.target(batch["pixel_values"])[mask]

    def loss(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        prediction, target = self._masked(output, batch)
        if target.numel() == 0:  # nothing masked in this batch: no signal, not NaN
            return output.logits.sum() * 0.0
        return F.mse_loss(prediction, target)

    def metric_state(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sums over the batch, all-reduced across ranks and added up over batches by the caller."""
        prediction, target = self._masked(output, batch)
        mask = batch["bool_masked_pos"].bool()
        return {
            "squared_error": (prediction.detach().double() - target.double()).square().sum(),
            "values": torch.tensor(float(target.numel()), dtype=torch.float64),
            "masked_patches": mask.sum().double(),
            "patches": torch.tensor(float(mask.numel()), dtype=torch.float64),
        }

    def compute_metrics(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """`pixel_mse` (lower is better), `masked_patches` scored and their share `mask_ratio`."""
        return {
            "pixel_mse": float(state["squared_error"]) / max(float(state["values"]), 1.0),
            "masked_patches": float(state["masked_patches"]),
            "mask_ratio": float(state["masked_patches"]) / max(float(state["patches"]), 1.0),
        }

    def reconstruct(self, prediction: torch.Tensor, pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The input with its masked patches replaced by the prediction, (B, 3, H, W) in the input's
        normalisation (a norm_pix prediction gets each true patch's mean and std back, as MAE shows it)."""
        patches = patchify(pixel_values.float(), self.patch)
        if self.opts.norm_pix:
            mean, std = patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
            prediction = prediction * std + mean
        mixed = torch.where(mask.bool().unsqueeze(-1), prediction.float(), patches)
        return unpatchify(mixed, self.patch, self.grid)

    @classmethod
    def pictures(cls, batch: Mapping[str, torch.Tensor], model: Callable[[], BeitForTask | None]) -> dict[str, Image]:
        """`pixels_<i>.png`: input | masked input (grey) | reconstruction, side by side; without a
        trained model, the default pictures (inputs and masked inputs)."""
        from beitdist.heads.pictures import grey_patches, pixels, to_image

        trained = model()
        if trained is None or "bool_masked_pos" not in batch:
            return super().pictures(batch, model)
        inputs, mask = pixels(batch), batch["bool_masked_pos"].bool().cpu()
        param, was_training = next(trained.parameters()), trained.training
        try:
            with torch.no_grad():
                out = trained.eval()(inputs.to(param.device, param.dtype), mask.to(param.device))
        finally:
            trained.train(was_training)
        recon = trained.head.reconstruct(out.logits.float().cpu(), inputs, mask)
        images = {}
        for i, (x, m, r) in enumerate(zip(inputs, mask, recon)):
            grey = grey_patches(x, m)
            panels = torch.cat([x, x, r], dim=-1)  # one stretch for the three: comparable colours
            images[f"pixels_{i}.png"] = to_image(panels, torch.cat([torch.zeros_like(grey), grey, torch.zeros_like(grey)], dim=-1))
        return images

    @classmethod
    def options_from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The decoder kind from the weights' shapes (norm_pix is not in the weights: the default)."""
        if "head.decoder.0.weight" in state_dict:  # nn.Sequential(Conv2d, PixelShuffle)
            return {"decoder": "pixel_shuffle"}
        return {"decoder": "linear"} if "head.decoder.weight" in state_dict else {}


@beitdist.hookimpl
def beitdist_register_heads(registry) -> None:
    registry.add(PixelRegressionHead)
