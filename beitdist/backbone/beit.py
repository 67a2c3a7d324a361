"""The BEiT encoder: patch embedding, blocks, final norm and pooling; no heads, no parallelism."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from beitdist.backbone.config import BackboneConfig
from beitdist.backbone.layers import INIT_STD, Block, PatchEmbed, RelativePositionBias
from beitdist.errors import InputError
from beitdist.outputs import BackboneOutput


def _trunc_normal(shape: tuple[int, ...]) -> nn.Parameter:
    tensor = torch.empty(shape)
    nn.init.trunc_normal_(tensor, std=INIT_STD, a=-2.0, b=2.0)
    return nn.Parameter(tensor)


class Beit(nn.Module):
    """BEiT encoder (arXiv 2106.08254), faithful to unilm's implementation.

    Attribute names are unilm's, so unilm and timm state dicts load as they are.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        dim, grid = config.embed_dim, config.grid_size
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        self.cls_token = _trunc_normal((1, 1, dim))
        self.mask_token = _trunc_normal((1, 1, dim)) if config.use_mask_token else None
        self.pos_embed = _trunc_normal((1, config.num_patches + 1, dim)) if config.abs_pos_emb else None
        self.pos_drop = nn.Dropout(config.drop_rate)
        shared = config.rel_pos_bias == "shared"
        self.rel_pos_bias = RelativePositionBias(grid, config.num_heads) if shared else None
        block_grid = grid if config.rel_pos_bias == "per_block" else None
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim,
                config.num_heads,
                config.hidden_mlp_dim,
                layer_id=i + 1,
                qkv_bias=config.qkv_bias,
                grid=block_grid,
                layer_scale_init=config.layer_scale_init,
                drop_path=rates[i],
                drop=config.drop_rate,
                attn_drop=config.attn_drop_rate,
                act=config.act,
                eps=config.layer_norm_eps,
            )
            for i in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps) if config.pooling == "cls" else nn.Identity()
        self.fc_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps) if config.pooling == "mean" else None
        self.grad_checkpointing = config.grad_checkpointing

    # ----------------------------------------------------------------- forward
    def embed(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels -> (B, 1 + N, D) tokens, masked patches replaced by the mask token."""
        self._check_input(pixel_values, bool_masked_pos)
        x = self.patch_embed(pixel_values)
        if bool_masked_pos is not None:
            assert self.mask_token is not None  # _check_input refused a mask for a model without a mask token
            w = bool_masked_pos.unsqueeze(-1).type_as(x)
            x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def shared_bias(self) -> torch.Tensor | None:
        return self.rel_pos_bias() if self.rel_pos_bias is not None else None

    def run_block(self, block: nn.Module, x: torch.Tensor, shared_bias: torch.Tensor | None) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, shared_bias, use_reentrant=False)
        return block(x, shared_bias)

    def forward_features(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 1 + N, D) tokens after the last block and the final norm."""
        return self(pixel_values, bool_masked_pos).last_hidden_state

    def pool(self, tokens: torch.Tensor) -> torch.Tensor | None:
        if self.config.pooling == "mean":
            assert self.fc_norm is not None  # built for mean pooling
            return self.fc_norm(tokens[:, 1:].mean(dim=1))
        if self.config.pooling == "cls":
            return tokens[:, 0]
        return None

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        intermediates: Sequence[int] | None = None,
    ) -> BackboneOutput:
        """Tokens and pooled vector; with `intermediates`, only the (B, 1 + N, D) outputs of those
        blocks (0-based), in `BackboneOutput.intermediates`, running no block past the deepest.

        Everything goes through this method (module call) because ZeRO-3 gathers a module's
        parameters in its forward hooks.
        """
        x = self.embed(pixel_values, bool_masked_pos)
        shared_bias = self.shared_bias()
        if intermediates is not None:
            wanted = self._block_indices(intermediates)
            outputs: dict[int, torch.Tensor] = {}
            for i, block in enumerate(self.blocks[: max(wanted) + 1]):
                x = self.run_block(block, x, shared_bias)
                if i in wanted:
                    outputs[i] = x
            return BackboneOutput(None, None, intermediates=[outputs[i] for i in wanted])
        states = [x] if output_hidden_states else None
        for block in self.blocks:
            x = self.run_block(block, x, shared_bias)
            if states is not None:
                states.append(x)
        tokens = self.norm(x)
        return BackboneOutput(tokens, self.pool(tokens), tuple(states) if states is not None else None)

    def _block_indices(self, indices: Sequence[int]) -> list[int]:
        depth = len(self.blocks)
        wanted = []
        for index in indices:
            if not -depth <= index < depth:
                raise InputError(f"forward_intermediates: block index {index} out of range for depth {depth}")
            wanted.append(index % depth)
        if not wanted:
            raise InputError("forward_intermediates: no block indices given")
        return wanted

    def forward_intermediates(
        self,
        pixel_values: torch.Tensor,
        indices: Sequence[int],
        output_fmt: str = "NCHW",
        bool_masked_pos: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Outputs of the blocks at `indices` (0-based, negatives from the end), for dense heads.

        NCHW maps drop the CLS token and fold the patch tokens back onto the grid; NLC keeps
        (B, 1 + N, D).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise InputError(f"output_fmt: got {output_fmt!r}; allowed: NCHW, NLC")
        outputs = self(pixel_values, bool_masked_pos, intermediates=indices).intermediates
        if output_fmt == "NLC":
            return outputs
        height, width = self.config.grid_size
        batch = pixel_values.shape[0]
        dim = self.config.embed_dim  # not -1: ONNX shape inference must know the channels (the head's pooling)
        return [x[:, 1:].transpose(1, 2).reshape(batch, dim, height, width).contiguous() for x in outputs]

    def _check_input(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> None:
        config = self.config
        expected = (config.in_chans, *config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise InputError(
                f"pixel_values: expected shape (B, {expected[0]}, {expected[1]}, {expected[2]}), got "
                f"{tuple(pixel_values.shape)}; load the model with image_size=... to change the resolution"
            )
        if bool_masked_pos is None:
            return
        if self.mask_token is None:
            raise InputError("bool_masked_pos given, but this backbone has no mask token (use_mask_token=False)")
        if tuple(bool_masked_pos.shape) != (pixel_values.shape[0], config.num_patches):
            raise InputError(
                f"bool_masked_pos: expected shape ({pixel_values.shape[0]}, {config.num_patches}), "
                f"got {tuple(bool_masked_pos.shape)}"
            )

    # ------------------------------------------------------ training helpers
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self, rel_pos_tables: bool = True) -> set[str]:
        """Parameters exempt from weight decay beyond 1-D ones and biases (unilm's rule: the mask
        token keeps its decay, as in unilm's pretraining model)."""
        names = {"cls_token", "pos_embed"}
        names = {n for n in names if getattr(self, n, None) is not None}
        if rel_pos_tables:
            names |= {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}
        return names

    @property
    def num_layer_ids(self) -> int:
        """Layer ids run 0 (embeddings) .. depth + 1 (everything after the last block)."""
        return len(self.blocks) + 2

    def layer_id(self, name: str) -> int:
        """BEiT's layer id of a parameter, for layer-wise lr decay: 0 for the embeddings,
        i + 1 for block i, depth + 1 for the rest (final norms, shared rel-pos table, heads)."""
        if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        match = re.match(r"blocks\.(\d+)\.", name)
        if match:
            return int(match.group(1)) + 1
        return len(self.blocks) + 1
