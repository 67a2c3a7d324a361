"""The building blocks of the BEiT encoder.

Parameter names match unilm's and timm's (`norm1`, `attn.qkv`, `q_bias`, `gamma_1`, ...), so their
checkpoints load with no renaming. Every parameter is initialised by the module that owns it, in
its own constructor (trunc-normal 0.02, BEiT's per-block rescale), which is what
`deepspeed.zero.Init` needs: a module's parameters are partitioned as soon as its constructor
returns, so a later `model.apply(init)` would touch empty shards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from beitdist.errors import InputError

INIT_STD = 0.02


class TruncNormalLinear(nn.Linear):
    """Linear with BEiT's init: truncated normal (std 0.02) times `init_scale`, zero bias.

    The init runs in `reset_parameters`, i.e. inside the Linear's own constructor: under
    `deepspeed.zero.Init` a module's parameters are partitioned as soon as its constructor
    returns, so initialising them afterwards from the parent would touch empty shards.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_scale: float = 1.0) -> None:
        self.init_scale = init_scale
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.trunc_normal_(self.weight, std=INIT_STD, a=-2.0, b=2.0)
            if self.init_scale != 1.0:
                self.weight.mul_(self.init_scale)
            if self.bias is not None:
                nn.init.zeros_(self.bias)


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    raise InputError(f"unknown activation {name!r}; allowed: gelu, gelu_tanh, relu, silu")


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, by a strided convolution (PyTorch's default init, as unilm)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """Index into the relative-position table for every (query, key) pair of 1 + H*W tokens.

    Rows 0 .. (2H-1)(2W-1)-1 hold patch-to-patch offsets; the last three rows hold cls->token,
    token->cls and cls->cls, exactly as unilm lays them out (so tables load without reindexing).
    Computed on the CPU, then moved to where a factory call without a device puts tensors (a
    `torch.device` context, `set_default_device`, DeepSpeed's zero.Init): under
    `torch.device("meta")` (a parameter count) stacking meta tensors would import torch._dynamo,
    seconds of a CLI's start.
    """
    height, width = grid
    num_distances = (2 * height - 1) * (2 * width - 1) + 3
    cpu = torch.device("cpu")
    coords = torch.stack(torch.meshgrid(torch.arange(height, device=cpu), torch.arange(width, device=cpu),
                                        indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    relative[:, :, 0] += height - 1
    relative[:, :, 1] += width - 1
    relative[:, :, 0] *= 2 * width - 1
    index = torch.zeros((height * width + 1,) * 2, dtype=torch.long, device=cpu)
    index[1:, 1:] = relative.sum(-1)
    index[0, 0:] = num_distances - 3
    index[0:, 0] = num_distances - 2
    index[0, 0] = num_distances - 1
    return index.to(torch.empty(0).device)


def num_relative_distances(grid: tuple[int, int]) -> int:
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


BIAS_ALIGNMENT = 16
"""Elements the key axis of a gathered bias is padded to. CUDA's memory-efficient SDPA kernel takes
an additive mask whose strides are multiples of its alignment as it is; any other mask it pads
into a fresh copy on every call, forward and backward, for every block."""


def gather_relative_position_bias(
    table: torch.Tensor, index: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(R, heads) table -> (heads, N, N) additive attention bias, gathered head-major in one copy.

    The result is a view into (heads, N, N') storage, N' = N rounded up to `BIAS_ALIGNMENT`, so
    every stride is aligned and SDPA uses it without a copy. The table is cast to `dtype` before
    the gather (a cast afterwards would copy the bias into unaligned, contiguous storage).
    """
    num_tokens = index.shape[0]
    aligned = -(-num_tokens // BIAS_ALIGNMENT) * BIAS_ALIGNMENT
    if aligned != num_tokens:
        index = F.pad(index, (0, aligned - num_tokens))  # padding gathers row 0; sliced off below
    if dtype is not None:
        table = table.to(dtype)
    bias = table.t()[:, index.reshape(-1)].view(table.shape[1], num_tokens, aligned)
    return bias[:, :, :num_tokens]


class GatheredBiasCache:
    """The gathered bias of one table, reused while the table is unchanged and no graph is built.

    Inference gathers the same (heads, N, N) bias for every batch; training must gather anew (the
    table changes every step and the gather is part of the graph). Tables ZeRO-3 partitions are
    never cached: their storage is re-gathered for each forward. The cached bias is what one
    forward allocates anyway, but kept (BEiT-L at 384 px with per-block tables: 24 x 22 MB in
    fp32) until the next forward that builds a graph frees it.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._bias: torch.Tensor | None = None

    def get(self, table: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if torch.is_grad_enabled() or hasattr(table, "ds_id") or torch.compiler.is_compiling():
            self._key = self._bias = None
            return gather_relative_position_bias(table, index, dtype)
        key = (table.data_ptr(), table._version, table.device, dtype, index.shape[0])
        if key != self._key or self._bias is None:
            self._bias = gather_relative_position_bias(table, index, dtype)
            self._key = key
        return self._bias


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout_p: float,
    training: bool = True,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v, by the fastest kernel for the device, dtype and mode.

    SDPA on GPUs (flash / memory-efficient kernels, which also compute the bias gradient). On CPUs
    (docs/performance.md, section 1):
    - eval mode (inference, evaluation): SDPA with the (heads, N, N) bias expanded to a (batch,
      heads, N, N) view. Only a 4-D mask reaches CPU's fused kernel; a 3-D one takes a slower path:
      1.3x faster than two matmuls and 2.2x faster than the 3-D mask in fp32, 2.4x in bf16;
    - training mode, fp32: SDPA would fall back to its math path with an extra "safe softmax"
      pass for a bias that needs a gradient, and two plain matmuls measured faster;
    - training mode, bf16: SDPA, 10x faster than bf16 matmuls on CPUs without bf16 units.
    The module's mode decides, not grad mode: activation checkpointing runs a block's forward
    without gradients and again with them, and both runs must compute the same numbers.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    if not training:
        mask = bias.expand(q.shape[0], *bias.shape[-3:]) if bias is not None and bias.dim() == 3 else bias
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if q.dtype != torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


class RelativePositionBias(nn.Module):
    """One relative-position table shared by every block (BEiT pretraining)."""

    relative_position_index: torch.Tensor

    def __init__(self, grid: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.grid = grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distances(grid), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)
        self.cache = GatheredBiasCache()

    def forward(self) -> torch.Tensor:
        """The bias in the dtype the attention scores will have (autocast's, if it is on), so no
        block casts it again."""
        table = self.relative_position_bias_table
        device = table.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else table.dtype
        return self.cache.get(table, self.relative_position_index, dtype)


class QkvLinear(TruncNormalLinear):
    """The fused q/k/v projection. BEiT's q and v biases (k has none) belong to the Attention
    that owns this module and are passed in, so they are added inside the matmul (addmm) rather
    than in another pass over the (B, N, 3D) output."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, bias if bias is not None else self.bias)


class Attention(nn.Module):
    """Multi-head self-attention with BEiT's q/v biases (zero key bias) and an optional own
    relative-position table; runs through `scaled_dot_product_attention` with the bias as mask."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        grid: tuple[int, int] | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        proj_init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = QkvLinear(dim, 3 * dim, bias=False)
        self.q_bias: nn.Parameter | None
        self.v_bias: nn.Parameter | None
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.relative_position_bias_table: nn.Parameter | None
        self.relative_position_index: torch.Tensor | None
        if grid is not None:
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distances(grid), num_heads))
            self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)
        else:
            self.relative_position_bias_table = None
            self.relative_position_index = None
        self.bias_cache = GatheredBiasCache()
        self.attn_drop = attn_drop
        self.proj = TruncNormalLinear(dim, dim, init_scale=proj_init_scale)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_bias(self) -> torch.Tensor | None:
        if self.q_bias is None or self.v_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))

    def forward(self, x: torch.Tensor, shared_bias: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # Calling the submodule (rather than F.linear on its weight) lets ZeRO-3 gather the weight.
        bias = self.qkv_bias()
        qkv = self.qkv(x, bias)
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = shared_bias
        if self.relative_position_bias_table is not None and self.relative_position_index is not None:
            own = self.bias_cache.get(self.relative_position_bias_table, self.relative_position_index, q.dtype)
            bias = own if bias is None else bias + own
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        x = attention(q, k, v, bias, self.attn_drop if self.training else 0.0, self.training)
        x = x.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, drop: float, fc2_init_scale: float = 1.0) -> None:
        super().__init__()
        self.fc1 = TruncNormalLinear(dim, hidden)
        self.act = activation(act)
        self.fc2 = TruncNormalLinear(hidden, dim, init_scale=fc2_init_scale)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Block(nn.Module):
    """Pre-norm transformer block with layer scale; `layer_id` (from 1) sets BEiT's init rescale
    of `attn.proj` and `mlp.fc2` by 1/sqrt(2 * layer_id)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        layer_id: int,
        qkv_bias: bool = True,
        grid: tuple[int, int] | None = None,
        layer_scale_init: float = 0.0,
        drop_path: float = 0.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        act: str = "gelu",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        rescale = 1.0 / math.sqrt(2.0 * layer_id)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, grid=grid, attn_drop=attn_drop, proj_drop=drop, proj_init_scale=rescale
        )
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, act, drop, fc2_init_scale=rescale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma_1: nn.Parameter | None
        self.gamma_2: nn.Parameter | None
        if layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma_1 = None
            self.gamma_2 = None

    def forward(self, x: torch.Tensor, shared_bias: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.attn(self.norm1(x), shared_bias)
        if self.gamma_1 is not None:
            attn = self.gamma_1 * attn
        x = x + self.drop_path(attn)
        mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            mlp = self.gamma_2 * mlp
        return x + self.drop_path(mlp)
