"""Drawing helpers for `Head.pictures`: what a head shows of its training examples (the MLflow
callback logs the images as artifacts at the end of a run).

Kept apart from the heads so a third-party head can draw the same way; PIL is imported on use,
since most processes never draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL.Image import Image


def pixels(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The batch's "pixel_values" as float32 on the CPU."""
    return batch["pixel_values"].detach().float().cpu()


def to_image(x: torch.Tensor, grey: torch.Tensor | None = None) -> Image:
    """(3, H, W) normalised tensor -> RGB image, stretched per image (whatever the normalisation),
    pixels where `grey` (H, W) is True grey, enlarged to ~224 px so tiny test images stay visible."""
    from PIL import Image

    lo, hi = x.amin(), x.amax()
    rgb = ((x - lo) / (hi - lo).clamp_min(1e-8) * 255).round().byte()
    if grey is not None:
        rgb[:, grey] = 128
    image = Image.fromarray(rgb.permute(1, 2, 0).contiguous().numpy())
    scale = max(1, 224 // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def grey_patches(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) patch mask -> (H, W) pixel mask; the patch grid follows the image's aspect ratio."""
    height, width = x.shape[-2:]
    rows = round(math.sqrt(mask.numel() * height / width))
    grid = mask.reshape(rows, mask.numel() // rows)
    return grid.repeat_interleave(height // grid.shape[0], 0).repeat_interleave(width // grid.shape[1], 1)


def inputs_and_masks(batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """`input_<i>.png` for each image and, when the batch has "bool_masked_pos", `masked_<i>.png`
    with the masked patches grey."""
    images = pixels(batch)
    out = {f"input_{i}.png": to_image(x) for i, x in enumerate(images)}
    mask = batch.get("bool_masked_pos")
    if mask is not None:
        for i, (x, m) in enumerate(zip(images, mask.bool().cpu())):
            out[f"masked_{i}.png"] = to_image(x, grey_patches(x, m))
    return out


def overlay(image: Image, classes: torch.Tensor) -> Image:
    """Class colours (a fixed palette) of an (H, W) class map blended half-and-half over the image."""
    from PIL import Image

    palette = torch.randint(0, 256, (int(classes.max()) + 1, 3), generator=torch.Generator().manual_seed(0))
    colours = Image.fromarray(palette[classes].byte().numpy()).resize(image.size, Image.Resampling.NEAREST)
    return Image.blend(image, colours, 0.5)


def dense_classes(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class per pixel (B, H, W) at input resolution from a model whose logits are (B, C, h, w);
    run in eval mode (no dropout, BatchNorm statistics kept), then the model's mode is restored:
    it may be the live training module."""
    import torch.nn.functional as F

    param, was_training = next(model.parameters()), model.training
    try:
        with torch.no_grad():
            logits = model.eval()(images.to(param.device, param.dtype)).logits.float()
    finally:
        model.train(was_training)
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear").argmax(1).cpu()


def labelled_grid(images: torch.Tensor, true: list[str], predicted: list[str] | None = None, columns: int = 4
                  ) -> Image:
    """The images in a grid, each captioned with its true label and, when given, the predicted one
    (green when they agree, red when not)."""
    from PIL import Image, ImageDraw

    tiles = [to_image(x) for x in images]
    width, height = max(t.width for t in tiles), max(t.height for t in tiles)
    caption = 14
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new("RGB", (columns * width, rows * (height + caption)), "white")
    draw = ImageDraw.Draw(grid)
    draw.fontmode = "1"  # crisp captions: exactly the two colours, readable at PIL's small default font
    for i, tile in enumerate(tiles):
        x, y = (i % columns) * width, (i // columns) * (height + caption)
        grid.paste(tile, (x, y))
        text = f"true {true[i]}"
        colour = (0, 0, 0)
        if predicted is not None:
            text += f" / pred {predicted[i]}"
            colour = (0, 128, 0) if predicted[i] == true[i] else (200, 0, 0)
        draw.text((x + 2, y + height + 1), text, fill=colour)
    return grid
