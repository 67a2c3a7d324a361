"""The vector quantizer of BEiT v2's VQ-KD tokenizer (arXiv 2208.06366, section 2.2), with the
codebook-usage care its users keep asking for (unilm#936, #1290: thousands of unused codes).

- Lookup by cosine similarity: vectors and codes are l2-normalised, the code is the nearest one.
- The codebook is not learned by gradient: each code is an exponential moving average of the
  normalised vectors assigned to it (counts and sums all-reduced across ranks, so every rank keeps
  the same codebook), re-normalised.
- Straight-through gradients: the output is z + (code - z).detach(); the commitment loss
  ||z - sg(code)||^2 pulls the encoder towards its codes.
- Dead codes: a code unused for `restart_after` updates is restarted on a vector of the current
  batch (gathered from every rank, chosen with a generator seeded by the update count, so all
  ranks pick the same ones); `usage()` says how much of the book the last window used, and its
  perplexity.

This is the building block of a trainable VQ-KD; the tokenizer that reads unilm's released
checkpoints is `beitdist.tokenizers.vqkd`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class Quantized:
    codes: torch.Tensor
    """The straight-through output (N, dim): the codes forward, z's gradient backward."""
    indices: torch.Tensor
    """(N,) code ids."""
    commitment: torch.Tensor
    """||z - sg(code)||^2 averaged (times `beta`)."""


class NormEmaQuantizer(nn.Module):
    FP32_STATE = ("codebook", "cluster_size", "embed_sum", "window_counts")
    codebook: torch.Tensor
    cluster_size: torch.Tensor
    embed_sum: torch.Tensor
    last_used: torch.Tensor
    window_counts: torch.Tensor
    updates: torch.Tensor

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, beta: float = 1.0,
                 restart_after: int = 0, eps: float = 1e-5, seed: int = 0) -> None:
        super().__init__()
        if num_codes < 2 or dim < 1 or not 0.0 <= decay < 1.0:
            raise ValueError(f"NormEmaQuantizer: num_codes >= 2, dim >= 1, 0 <= decay < 1; got {num_codes}, {dim}, "
                             f"{decay}")
        self.num_codes, self.dim, self.decay, self.beta, self.eps = num_codes, dim, decay, beta, eps
        self.restart_after = restart_after
        """Restart codes unused for this many updates (0: never)."""
        self.seed = seed
        init = F.normalize(torch.randn(num_codes, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)
        self.register_buffer("codebook", init)
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", init.clone())
        self.register_buffer("last_used", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("window_counts", torch.zeros(num_codes))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def _apply(self, fn, recurse=True):  # nn.Module's own (untyped) signature
        """The codebook and its EMA statistics stay fp32 whatever the module is cast to (a blanket
        `.bfloat16()` / `.half()`, as older DeepSpeed versions applied to the whole model): an EMA
        with decay 0.99 moves a code by 1% of the way per step, below bf16's resolution, and counts
        past 256 stop adding up in bf16."""
        super()._apply(fn, recurse)
        for name in self.FP32_STATE:
            buffer = self._buffers[name]
            if buffer is not None and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()
        return self

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """(N,) ids of the nearest codes to the (N, dim) vectors (cosine similarity, in fp32 even
        under autocast: bf16's 3 digits would rank close codes wrongly)."""
        with torch.autocast(z.device.type, enabled=False):
            return (F.normalize(z.float(), dim=-1) @ self.codebook.t()).argmax(dim=-1)

    def forward(self, z: torch.Tensor) -> Quantized:
        """Quantize (N, dim) vectors; in training mode, also update the codebook (a collective
        when a process group is up: every rank must call it for every batch). fp32 throughout,
        under autocast too."""
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z)

    def _quantize(self, z: torch.Tensor) -> Quantized:
        z = F.normalize(z.float(), dim=-1)
        indices = self.lookup(z)
        codes = self.codebook[indices]
        commitment = self.beta * F.mse_loss(z, codes.detach())
        if self.training:
            self._update(z.detach(), indices)
        return Quantized(z + (codes - z).detach(), indices, commitment)

    @torch.no_grad()
    def _update(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.num_codes).float()
        sums = torch.zeros(self.num_codes, self.dim, device=z.device).index_add_(0, indices, z)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.updates += 1
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        used = counts > 0
        averaged = F.normalize(self.embed_sum / self.cluster_size.clamp_min(self.eps)[:, None], dim=-1)
        self.codebook.copy_(torch.where(used[:, None], averaged, self.codebook))
        self.last_used[used] = self.updates
        self.window_counts += counts
        if self.restart_after:
            self._restart_dead(z, distributed)

    @torch.no_grad()
    def _restart_dead(self, z: torch.Tensor, distributed: bool) -> None:
        dead = (self.updates - self.last_used) >= self.restart_after
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        if distributed:
            gathered = [torch.empty_like(z) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, z)  # equal batch shapes on every rank (the loop's fixed batch size)
            z = torch.cat(gathered)
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + int(self.updates))
        picks = torch.randint(0, z.shape[0], (n_dead,), generator=generator).to(z.device)
        fresh = z[picks]
        slots = dead.nonzero().squeeze(1)
        self.codebook[slots] = fresh
        self.embed_sum[slots] = fresh
        self.cluster_size[slots] = 1.0
        self.last_used[slots] = self.updates

    def usage(self, reset: bool = True) -> dict[str, float]:
        """Codebook use since the last reset: the fraction of codes used and the perplexity of the
        code distribution (num_codes when all are used equally, 1 when one code takes all)."""
        total = float(self.window_counts.sum())
        if total == 0:
            return {"codebook_usage": 0.0, "codebook_perplexity": 0.0}
        p = self.window_counts / total
        entropy = -float((p[p > 0] * p[p > 0].log()).sum())
        result = {"codebook_usage": float((self.window_counts > 0).float().mean()),
                  "codebook_perplexity": math.exp(entropy)}
        if reset:
            self.window_counts.zero_()
        return result
