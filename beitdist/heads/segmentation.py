"""Semantic segmentation: BEiT's 4-scale neck + UperNet decode head + FCN auxiliary head.

The architecture is unilm's `beit/semantic_segmentation` (mmseg's UPerHead / FCNHead), which is
also transformers' `BeitForSemanticSegmentation`; module names are transformers' ON-DISK names
(mmseg's, with `conv_seg` called `classifier`), so checkpoints map with a plain `head.` prefix.

Logits come out at 1/4 of the input resolution, as in both references; the loss and the metrics
upsample them to the label size (bilinear, align_corners=False).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from beitdist.backbone.config import BackboneConfig
from beitdist.data.needs import DataNeeds
from beitdist.heads import segmentation_formats as seg_formats
from beitdist.heads.base import Forward, Head, HeadOutput
from beitdist.heads.segmentation_eval import (
    intersect_and_union,
    metrics_from_areas,
    multiscale_flip_inference,
    per_class_report,
    resize_logits,
    slide_inference,
)
from beitdist.hookspecs import hookimpl
from beitdist.outputs import ModelOutput
from beitdist.schema import check, to_dict

if TYPE_CHECKING:
    from PIL.Image import Image

    from beitdist.model import BeitForTask

log = logging.getLogger(__name__)

SyncMode = Literal["auto", "always", "never"]
UNILM_BLOCK_INDICES = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23)}


def default_block_indices(depth: int) -> tuple[int, ...]:
    """unilm's choice for B (12 blocks) and L (24); otherwise four evenly spaced blocks ending at
    the last one (repeats are possible below 4 blocks, which the head accepts)."""
    if depth in UNILM_BLOCK_INDICES:
        return UNILM_BLOCK_INDICES[depth]
    return tuple(max(0, round((k + 1) * depth / 4) - 1) for k in range(4))


@dataclass(frozen=True)
class SegmentationOptions:
    num_classes: int = 150
    block_indices: tuple[int, ...] | None = None
    """0-based blocks whose OUTPUTS feed the neck (unilm's `out_indices`); None: unilm's defaults."""
    channels: int | None = None
    """UperNet width; None means embed_dim (unilm, and the only value transformers can express)."""
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    use_auxiliary_head: bool = True
    auxiliary_channels: int = 256
    auxiliary_num_convs: int = 1
    auxiliary_concat_input: bool = False
    auxiliary_loss_weight: float = 0.4
    ignore_index: int = 255
    dropout: float = 0.1
    """mmseg's `dropout_ratio` (Dropout2d before each classifier, training only); transformers has
    none, which only matters in training."""
    sync_batchnorm: SyncMode = "auto"
    """'auto': SyncBatchNorm when distributed with world size > 1 on a device torch can sync
    (not CPU: per-process BN there, logged); 'always': the same, but an error where it cannot;
    'never': per-process BatchNorm."""

    def __post_init__(self) -> None:
        check(self.num_classes > 0, "num_classes", f"expected a positive int, got {self.num_classes}")
        if self.block_indices is not None:
            check(len(self.block_indices) == 4, "block_indices",
                  f"expected 4 block indices, got {list(self.block_indices)}")
        check(self.channels is None or self.channels > 0, "channels",
              f"expected a positive int or null, got {self.channels}")
        check(len(self.pool_scales) > 0 and all(s > 0 for s in self.pool_scales), "pool_scales",
              f"expected a non-empty list of positive ints, got {list(self.pool_scales)}")
        check(self.auxiliary_channels > 0, "auxiliary_channels",
              f"expected a positive int, got {self.auxiliary_channels}")
        check(self.auxiliary_num_convs >= 0, "auxiliary_num_convs",
              f"expected an int >= 0, got {self.auxiliary_num_convs}")
        check(self.auxiliary_loss_weight >= 0, "auxiliary_loss_weight",
              f"expected >= 0, got {self.auxiliary_loss_weight}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"expected a value in [0, 1), got {self.dropout}")


# ------------------------------------------------------------------ batch norm
_warned_cpu_sync = False


class HeadBatchNorm(nn.SyncBatchNorm):
    """BatchNorm for the neck and heads, one class for every setting (same state-dict keys as
    BatchNorm2d, so checkpoints do not care).

    Synchronises across ranks like SyncBatchNorm when `sync` allows it; torch's SyncBatchNorm
    refuses CPU tensors whenever torch.distributed is initialised (even at world size 1), so on
    CPU it stays per-process. In training, a map with ONE value per channel (the PPM's 1x1 pool at
    batch 1 per process) has no batch statistics; plain BatchNorm raises there, this one
    normalises with its running statistics and updates nothing for that call.
    """

    def __init__(self, num_features: int, sync: SyncMode = "auto") -> None:
        super().__init__(num_features)
        self.sync = sync

    def _syncs(self, x: torch.Tensor) -> bool:
        if not (self.training and self.sync != "never" and dist.is_available() and dist.is_initialized()):
            return False
        if dist.get_world_size(self.process_group or dist.group.WORLD) < 2:
            return False
        if x.device.type not in ("cpu", "mps"):
            return True
        if self.sync == "always":
            raise RuntimeError(
                "sync_batchnorm='always', but torch's SyncBatchNorm only runs on accelerators and the input is on "
                f"{x.device.type}; use sync_batchnorm='auto' (per-process BN there) or an accelerator"
            )
        global _warned_cpu_sync
        if not _warned_cpu_sync:
            log.warning("SyncBatchNorm does not run on %s tensors; using per-process BatchNorm", x.device.type)
            _warned_cpu_sync = True
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._syncs(x):
            return super().forward(x)
        if self.training and x.numel() == x.shape[1]:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super(nn.SyncBatchNorm, self).forward(x)  # _BatchNorm's per-process path


# ------------------------------------------------------------------ building blocks
class KaimingConv2d(nn.Conv2d):
    """mmseg's ConvModule init: kaiming-normal (fan_out, relu). Done in `reset_parameters`, inside
    the conv's own constructor, so it also holds under deepspeed.zero.Init (which partitions a
    module's parameters when its constructor returns)."""

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ClassifierConv2d(nn.Conv2d):
    """mmseg's classifier init: N(0, 0.01), zero bias (in the constructor, see KaimingConv2d)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.01)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ConvModule(nn.Module):
    """mmcv's ConvModule as BEiT uses it: conv (no bias) -> BN -> ReLU, names `conv` / `bn`."""

    def __init__(self, cin: int, cout: int, kernel: int, sync: SyncMode, padding: int = 0) -> None:
        super().__init__()
        self.conv = KaimingConv2d(cin, cout, kernel, padding=padding, bias=False)
        self.bn = HeadBatchNorm(cout, sync)
        self.activate = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def _average_bins(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """(out, size) matrix averaging adaptive pooling's bins: bin i covers [floor(i * size / out),
    ceil((i + 1) * size / out)), as torch's adaptive_avg_pool2d."""
    matrix = torch.zeros(out, size, dtype=like.dtype, device=like.device)
    for i in range(out):
        start, end = (i * size) // out, -(-(i + 1) * size // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class PyramidPool(nn.AdaptiveAvgPool2d):
    """`nn.AdaptiveAvgPool2d`; under ONNX export the same bins as two averaging matmuls, since
    ONNX pooling cannot give output sizes that do not divide the input (UperNet's 3 and 6 bins
    of a 20x20 map)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return super().forward(x)
        size: Any = self.output_size
        out_h, out_w = (size, size) if isinstance(size, int) else size
        rows = _average_bins(int(x.shape[-2]), int(out_h or x.shape[-2]), x)
        cols = _average_bins(int(x.shape[-1]), int(out_w or x.shape[-1]), x)
        return rows @ x @ cols.transpose(0, 1)


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UperNetHead(nn.Module):
    """mmseg's UPerHead: pyramid pooling on the coarsest map, a top-down FPN, then fuse and classify."""

    def __init__(self, dim: int, channels: int, opts: SegmentationOptions) -> None:
        super().__init__()
        sync = opts.sync_batchnorm
        self.psp_modules = nn.ModuleList(
            nn.Sequential(PyramidPool(scale), ConvModule(dim, channels, 1, sync)) for scale in opts.pool_scales
        )
        self.bottleneck = ConvModule(dim + len(opts.pool_scales) * channels, channels, 3, sync, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(dim, channels, 1, sync) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, sync, padding=1) for _ in range(3))
        self.fpn_bottleneck = ConvModule(4 * channels, channels, 3, sync, padding=1)
        self.dropout = nn.Dropout2d(opts.dropout)
        self.classifier = ClassifierConv2d(channels, opts.num_classes, 1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        top = maps[-1]
        pooled = [_upsample(ppm(top), top.shape[2:]) for ppm in self.psp_modules]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _upsample(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_upsample(x, size) for x in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """mmseg's FCNHead on the third map: a few 3x3 ConvModules (optionally concatenated with the
    input) and a 1x1 classifier; only trained through the auxiliary loss."""

    def __init__(self, dim: int, opts: SegmentationOptions) -> None:
        super().__init__()
        channels, sync = opts.auxiliary_channels, opts.sync_batchnorm
        if opts.auxiliary_num_convs == 0:
            check(channels == dim, "head.options.auxiliary_channels",
                  f"with auxiliary_num_convs 0 it must equal embed_dim {dim} (as in mmseg), got {channels}")
        self.convs = nn.ModuleList(
            ConvModule(dim if i == 0 else channels, channels, 3, sync, padding=1)
            for i in range(opts.auxiliary_num_convs)
        )
        self.conv_cat = (
            ConvModule(dim + channels, channels, 3, sync, padding=1) if opts.auxiliary_concat_input else None
        )
        self.dropout = nn.Dropout2d(opts.dropout)
        self.classifier = ClassifierConv2d(channels, opts.num_classes, 1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        x = inputs = maps[2]
        for conv in self.convs:
            x = conv(x)
        if self.conv_cat is not None:
            x = self.conv_cat(torch.cat([inputs, x], dim=1))
        return self.classifier(self.dropout(x))


# ------------------------------------------------------------------ the head
class SegmentationHead(Head):
    """Four block outputs -> x4 / x2 / x1 / x0.5 maps (fpn1..fpn4) -> UperNet (+ FCN auxiliary)."""

    name = "segmentation"
    Options = SegmentationOptions
    needs = "pyramid"
    prediction = "label_map"
    pooling = ("none",)
    data_needs = DataNeeds(labels="map")
    hf_architecture = "BeitForSemanticSegmentation"
    hf_keys = seg_formats.HF_KEYS
    hf_pooler = False
    unilm_keys = seg_formats.UNILM_KEYS

    def __init__(self, backbone: BackboneConfig, options: SegmentationOptions | None = None) -> None:
        super().__init__(backbone, options)
        opts, dim, depth = self.opts, backbone.embed_dim, backbone.depth
        indices = opts.block_indices if opts.block_indices is not None else default_block_indices(depth)
        for index in indices:
            check(-depth <= index < depth, "head.options.block_indices",
                  f"index {index} out of range for {depth} blocks")
        self.block_indices = tuple(i % depth for i in indices)
        self.channels = opts.channels or dim
        sync = opts.sync_batchnorm
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2), HeadBatchNorm(dim, sync), nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.decode_head = UperNetHead(dim, self.channels, opts)
        self.auxiliary_head = FCNHead(dim, opts) if opts.use_auxiliary_head else None

    def options(self) -> dict[str, Any]:
        """With the defaults resolved, so a checkpoint says which blocks and width it was built with."""
        return {**to_dict(self.opts), "block_indices": list(self.block_indices), "channels": self.channels}

    def forward(self, features: Sequence[torch.Tensor], bool_masked_pos: torch.Tensor | None = None) -> HeadOutput:
        if len(features) != 4:
            raise ValueError(f"the segmentation head takes 4 feature maps, got {len(features)}")
        maps = [self.fpn1(features[0]), self.fpn2(features[1]), self.fpn3(features[2]), self.fpn4(features[3])]
        aux = self.auxiliary_head(maps) if self.auxiliary_head is not None else None
        return HeadOutput(self.decode_head(maps), aux)

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over the non-ignored pixels, as transformers (and mmseg with avg_non_ignore=True;
        the mmseg of unilm's runs divided by all pixels); 0, not NaN, for an all-ignored batch,
        without a host sync."""
        logits = resize_logits(logits.float(), labels.shape[-2:])
        total = F.cross_entropy(logits, labels, ignore_index=self.opts.ignore_index, reduction="sum")
        return total / (labels != self.opts.ignore_index).sum().clamp_min(1)

    def loss(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"].long()
        loss = self._cross_entropy(output.logits, labels)
        if output.aux_logits is not None and self.opts.auxiliary_loss_weight > 0:
            loss = loss + self.opts.auxiliary_loss_weight * self._cross_entropy(output.aux_logits, labels)
        return loss

    def metric_state(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        pred = resize_logits(output.logits, labels.shape[-2:]).argmax(dim=1)
        return intersect_and_union(pred, labels, self.opts.num_classes, self.opts.ignore_index)

    def compute_metrics(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return metrics_from_areas(state)

    def evaluate_batch(self, forward: Forward, batch: Mapping[str, torch.Tensor], mode: str = "whole") -> ModelOutput:
        """mode "slide": mmseg's sliding window over the batch's images, crops of the model's input
        size with a stride of 2/3 of it (BEiT on ADE20K: 640 / 426); "ms-flip": the same at scales
        0.5-1.75 and mirrored, probabilities averaged (mmseg's aug_test); otherwise the whole images."""
        if mode not in ("slide", "ms-flip"):
            return super().evaluate_batch(forward, batch, mode)
        size = self.backbone_config.image_size[0]
        run = slide_inference if mode == "slide" else multiscale_flip_inference
        logits = run(lambda x: forward(x, None).logits, batch["pixel_values"], crop=size, stride=size * 2 // 3,
                     num_classes=self.opts.num_classes)
        return ModelOutput(logits=logits, last_hidden_state=None)

    def report(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return per_class_report(state)

    @classmethod
    def pictures(cls, batch: Mapping[str, torch.Tensor], model: Callable[[], BeitForTask | None]) -> dict[str, Image]:
        """The inputs and, when there is a trained model, its predictions over them (`prediction_<i>.png`)."""
        from beitdist.heads.pictures import dense_classes, overlay, pixels, to_image

        images = super().pictures(batch, model)
        trained = model()
        if trained is not None:
            inputs = pixels(batch)
            for i, (x, classes) in enumerate(zip(inputs, dense_classes(trained, inputs))):
                images[f"prediction_{i}.png"] = overlay(to_image(x), classes)
        return images

    @classmethod
    def options_from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return seg_formats.options_from_shapes(state_dict)

    @classmethod
    def options_from_hf(cls, hf_config: Mapping[str, Any], backbone: BackboneConfig) -> dict[str, Any]:
        return seg_formats.options_from_hf(hf_config, backbone.depth)

    def hf_config(self) -> dict[str, Any]:
        return seg_formats.hf_config(self.options(), self.backbone_config.embed_dim, self.backbone_config.depth)


@hookimpl
def beitdist_register_heads(registry) -> None:
    registry.add(SegmentationHead)
