"""Training BEiT v2's VQ-KD tokenizer (arXiv 2208.06366, section 2.2) as a head: `head: vqkd_training`.

The backbone is the tokenizer's encoder. The head:

1. normalises its patch tokens (unilm's encoder has a mean-pooling norm applied per token);
2. maps them to the code space (`encode_task_layer`: Linear, Tanh, Linear);
3. quantizes them (`NormEmaQuantizer`: cosine lookup, EMA codebook, dead-code restarts);
4. decodes the codes with a shallow transformer (`decoder`: a 1x1 patch embedding of the codes,
   absolute positions, `decoder_depth` blocks, a norm);
5. regresses a frozen teacher's patch features with them (`decode_task_layer`). The loss is
   1 - cosine similarity to the teacher's features, plus the commitment term.

The teacher is any checkpoint `load_model` reads (a transformers directory, a unilm file, a
beitdist run). It is loaded at the first loss, outside ZeRO-3's construction context, resampled to
the recipe's image size, frozen, and kept out of the state dict and the optimizer. It reads the
same `pixel_values` as the encoder, so the recipe's normalisation must be the teacher's.

Codebook usage on the validation split is reported by every evaluation: `val_codebook_usage` (the
fraction of codes used) and `val_codebook_perplexity`. Tokens of a trained run:
`export_vqkd(run_or_final, path)` (here: the head owns its checkpoint keys) writes unilm's VQ-KD
layout, which the `vqkd` tokenizer reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from beitdist.backbone.config import BackboneConfig
from beitdist.backbone.layers import Block
from beitdist.data.needs import DataNeeds
from beitdist.errors import InputError
from beitdist.heads.base import Head
from beitdist.hookspecs import hookimpl
from beitdist.schema import check
from beitdist.tokenizers.quantizer import NormEmaQuantizer

if TYPE_CHECKING:
    from beitdist.model import ModelOutput


@dataclass(frozen=True)
class VqkdOptions:
    teacher: str
    """The frozen teacher: any checkpoint `load_model` reads (unilm: CLIP ViT-B/16's features)."""
    num_codes: int = 8192
    code_dim: int = 32
    decay: float = 0.99
    """The codebook's EMA decay (unilm: 0.99)."""
    beta: float = 1.0
    """Weight of the commitment loss."""
    restart_after: int = 100
    """Restart a code unused for this many training batches (0: never)."""
    decoder_depth: int = 3
    """unilm's recommended tokenizer: vqkd_encoder_base_decoder_3x768x12_clip."""
    teacher_trust_pickle: bool = False
    teacher_dim: int | None = None
    """The teacher's feature width; None: read from the teacher checkpoint when the head is built
    (a trained head's checkpoint records it, so loading one never needs the teacher)."""

    def __post_init__(self) -> None:
        check(bool(self.teacher), "teacher", "expected a checkpoint path (the frozen teacher)")
        check(self.num_codes >= 2, "num_codes", f"expected >= 2, got {self.num_codes}")
        check(self.code_dim >= 1, "code_dim", f"expected >= 1, got {self.code_dim}")
        check(0.0 <= self.decay < 1.0, "decay", f"expected 0 <= decay < 1, got {self.decay}")
        check(self.restart_after >= 0, "restart_after", f"expected >= 0, got {self.restart_after}")
        check(self.decoder_depth >= 1, "decoder_depth", f"expected >= 1, got {self.decoder_depth}")


class _Teacher:
    """The frozen teacher, outside the module tree (no state dict, no optimizer, no ZeRO)."""

    def __init__(self) -> None:
        self.model: Any = None


def _task_layer(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_in), nn.Tanh(), nn.Linear(dim_in, dim_out))


class VqkdHead(Head):
    name = "vqkd_training"
    Options = VqkdOptions
    needs = "tokens"
    pooling = ("none",)
    data_needs = DataNeeds(labels=None)

    def __init__(self, backbone: BackboneConfig, options: VqkdOptions | None = None) -> None:
        super().__init__(backbone, options)
        opts: VqkdOptions = self.opts
        dim, eps = backbone.embed_dim, backbone.layer_norm_eps
        self.encoder_norm = nn.LayerNorm(dim, eps=eps)
        self.encode_task_layer = _task_layer(dim, opts.code_dim)
        self.quantize = NormEmaQuantizer(opts.num_codes, opts.code_dim, opts.decay, opts.beta, opts.restart_after)
        self.decoder_embed = nn.Linear(opts.code_dim, dim)  # unilm: a 1x1 convolution of the code map
        self.decoder_pos = nn.Parameter(torch.zeros(1, backbone.num_patches, dim))
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)
        self.decoder = nn.ModuleList(
            Block(dim, backbone.num_heads, backbone.hidden_mlp_dim, layer_id=i + 1, qkv_bias=True, eps=eps)
            for i in range(opts.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=eps)
        self.teacher_dim = opts.teacher_dim or teacher_width(opts.teacher, opts.teacher_trust_pickle)
        self.decode_task_layer = _task_layer(dim, self.teacher_dim)
        self.teacher = _Teacher()
        self._last: dict[str, torch.Tensor] = {}

    def options(self) -> dict[str, Any]:
        return {**super().options(), "teacher_dim": self.teacher_dim}

    def forward(self, features: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.encoder_norm(features[:, 1:])
        batch, patches, _ = tokens.shape
        z = self.encode_task_layer(tokens).reshape(batch * patches, -1)
        quantized = self.quantize(z)
        self._last = {"commitment": quantized.commitment, "indices": quantized.indices.reshape(batch, patches)}
        x = self.decoder_embed(quantized.codes.reshape(batch, patches, -1).to(tokens.dtype)) + self.decoder_pos
        for block in self.decoder:
            x = block(x)
        return self.decode_task_layer(self.decoder_norm(x))

    @torch.no_grad()
    def teacher_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        teacher = self._teacher(pixel_values.device)
        return teacher(pixel_values.to(next(teacher.parameters()).dtype)).last_hidden_state[:, 1:].float()

    def _teacher(self, device: torch.device) -> Any:
        if self.teacher.model is None:
            from beitdist.checkpoint import load_model

            size = self.backbone_config.image_size[0]
            model = load_model(self.opts.teacher, head=None, trust_pickle=self.opts.teacher_trust_pickle,
                               image_size=size)
            self.teacher.model = model.backbone.eval().requires_grad_(False)
        if next(self.teacher.model.parameters()).device != device:
            self.teacher.model.to(device)
        return self.teacher.model

    def _cosine_distance(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pixels = batch["pixel_values"]
        if self._last.get("pixels") is not pixels:  # an evaluation asks loss and metric_state: one teacher pass
            self._last["pixels"], self._last["target"] = pixels, self.teacher_features(pixels)
        return 1.0 - F.cosine_similarity(output.logits.float(), self._last["target"], dim=-1)

    def loss(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._cosine_distance(output, batch).mean() + self._last["commitment"]

    def metric_state(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        indices = self._last["indices"].reshape(-1)
        return {"code_counts": torch.bincount(indices, minlength=self.opts.num_codes).double(),
                "cosine_distance": self._cosine_distance(output, batch).sum().double(),
                "patches": torch.tensor(float(indices.numel()), dtype=torch.float64)}

    def compute_metrics(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        counts = state["code_counts"]
        total = float(counts.sum())
        p = counts[counts > 0] / max(total, 1.0)
        return {"codebook_usage": float((counts > 0).double().mean()),
                "codebook_perplexity": math.exp(-float((p * p.log()).sum())) if total else 0.0,
                "rec_cosine": 1.0 - float(state["cosine_distance"]) / max(float(state["patches"]), 1.0)}

    @classmethod
    def options_from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        codebook = state_dict.get("head.quantize.codebook")
        if codebook is not None:
            options["num_codes"], options["code_dim"] = codebook.shape
        depth = {int(k.split(".")[2]) for k in state_dict if k.startswith("head.decoder.")}
        if depth:
            options["decoder_depth"] = max(depth) + 1
        out = state_dict.get("head.decode_task_layer.2.weight")
        if out is not None:
            options["teacher_dim"] = out.shape[0]
        return options


VQKD_FORMAT = "beitdist-vqkd"


def is_vqkd_file(path: Path) -> bool:
    """Whether `path` is a VQ-KD tokenizer file `export_vqkd` wrote."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == VQKD_FORMAT
    except Exception:  # noqa: BLE001 - not a safetensors file: not one of ours
        return False


def export_vqkd(source: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """A tokenizer trained with `head: vqkd_training` (a run directory or its final/ weights) as a file in
    unilm's VQ-KD layout (`encoder.*`, `encode_task_layer.*`, `quantize.embedding.weight`, and
    the decoder for completeness), which the `vqkd` tokenizer reads. Written atomically; an
    existing VQ-KD file is replaced only with `overwrite`."""
    from beitdist.checkpoint import load_model
    from beitdist.output_paths import check_output_file, write_safetensors_file
    from beitdist.tokenizers.vqkd import CODEBOOK, ENCODER, NUM_HEADS_KEY, TASK_LAYER

    path = check_output_file(out, "VQ-KD tokenizer", is_vqkd_file, overwrite=overwrite)
    model = load_model(source, head="auto")
    if model.head_name != VqkdHead.name:
        raise InputError(f"{source}: holds a {model.head_name!r} model, not a VQ-KD tokenizer trained with "
                         f"head: {VqkdHead.name}")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            tensors[ENCODER + key.removeprefix("backbone.")] = value
        elif key.startswith("head.encoder_norm."):
            tensors[ENCODER + "fc_norm." + key.removeprefix("head.encoder_norm.")] = value
        elif key.startswith("head.encode_task_layer."):
            tensors[TASK_LAYER + key.removeprefix("head.encode_task_layer.")] = value
        elif key == "head.quantize.codebook":
            tensors[CODEBOOK] = value
        elif key.startswith("head.") and not key.startswith("head.quantize."):
            tensors["decoder." + key.removeprefix("head.")] = value  # decoder and its task layer: not read back
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()
               if not k.endswith("relative_position_index")}
    # the head count is not in the weights when the encoder has no relative-position table
    return write_safetensors_file(path, tensors, {"format": VQKD_FORMAT,
                                                  NUM_HEADS_KEY: str(model.backbone.config.num_heads)})


def add_export_cli(tokenizer_commands: Any) -> None:
    """`beitdist tokenizer export-vqkd RUN --out FILE`."""
    export = tokenizer_commands.add_parser(
        "export-vqkd",
        help=f"a VQ-KD tokenizer trained by a run (head: {VqkdHead.name}) as a file the 'vqkd' tokenizer reads",
        description="Write the encoder, task layer and codebook of a VQ-KD training run in unilm's layout.")
    export.add_argument("source", help="the run directory (or its final/ weights)")
    export.add_argument("--out", required=True, help="tokenizer file to write (.safetensors, written atomically)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing VQ-KD file at --out")
    export.set_defaults(run=_cmd_export)


def _cmd_export(args: Any) -> int:
    path = export_vqkd(args.source, args.out, overwrite=args.overwrite)
    print(f"wrote VQ-KD tokenizer {path} (recipe: tokenizer: {{name: vqkd, options: {{path: {path}}}}})")
    return 0


def teacher_width(path: str, trust_pickle: bool = False) -> int:
    """The teacher's feature width, from its config alone."""
    from beitdist.checkpoint import read_checkpoint

    return read_checkpoint(path, trust_pickle=trust_pickle).config.embed_dim


@hookimpl
def beitdist_register_heads(registry) -> None:
    registry.add(VqkdHead)
