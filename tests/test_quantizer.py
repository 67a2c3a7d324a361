"""BEiT v2's norm-EMA vector quantizer (the building block of a trainable VQ-KD): cosine lookup,
straight-through gradients, the EMA codebook as a hand computation, dead-code restarts that keep
the book in use (and what usage is without them), and identical codebooks on 2 gloo ranks that
each saw different data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from beitdist.tokenizers.quantizer import NormEmaQuantizer


def test_lookup_is_the_most_similar_code_and_gradients_pass_straight_through():
    q = NormEmaQuantizer(8, 4, seed=0).eval()
    z = torch.randn(10, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = q(z)
    expected = (F.normalize(z.detach(), dim=-1) @ q.codebook.t()).argmax(dim=-1)
    assert torch.equal(out.indices, expected)
    torch.testing.assert_close(out.codes.detach(), q.codebook[expected])
    out.codes.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # the codes' gradient reaches the encoder
    assert torch.equal(q.lookup(z.detach()), expected)  # deterministic, and eval mode changed nothing
    assert int(q.updates) == 0


def test_with_decay_zero_a_used_code_becomes_the_normalised_mean_of_its_vectors():
    q = NormEmaQuantizer(4, 3, decay=0.0, seed=0).train()
    before = q.codebook.clone()
    z = F.normalize(torch.randn(32, 3, generator=torch.Generator().manual_seed(2)), dim=-1)
    indices = q(z).indices
    for code in range(4):
        members = z[indices == code]
        if len(members):
            torch.testing.assert_close(q.codebook[code], F.normalize(members.mean(0), dim=0))
        else:
            torch.testing.assert_close(q.codebook[code], before[code])  # an unused code keeps its place


def _clustered(n: int, centres: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(centres), (n,), generator=gen)
    return centres[picks] + 0.05 * torch.randn(n, centres.shape[1], generator=gen)


def _train_usage(restart_after: int) -> float:
    centres = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(7)), dim=-1)
    centres[:, 0] += 3.0  # the data live in one cap of the sphere: a random book mostly misses it
    q = NormEmaQuantizer(64, 16, decay=0.9, restart_after=restart_after, seed=3).train()
    for step in range(300):
        q(_clustered(256, centres, step))
    q.usage()  # the warm-up window
    for step in range(300, 320):
        q(_clustered(256, centres, step))
    return q.usage()["codebook_usage"]


def test_dead_code_restarts_keep_the_book_in_use():
    without, with_restarts = _train_usage(0), _train_usage(10)
    assert without < 0.5, without  # most codes never win a vector
    assert with_restarts >= 0.8, with_restarts


def _two_ranks(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        q = NormEmaQuantizer(16, 8, decay=0.5, restart_after=3, seed=5).train()
        for step in range(8):  # each rank its own data
            q(torch.randn(64, 8, generator=torch.Generator().manual_seed(100 * rank + step)))
        torch.save({"codebook": q.codebook, "cluster_size": q.cluster_size}, Path(out, f"rank_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_data_keep_one_codebook(tmp_path):
    mp.spawn(_two_ranks, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank_{r}.pt") for r in range(2))
    assert torch.equal(a["codebook"], b["codebook"]) and torch.equal(a["cluster_size"], b["cluster_size"])
    # and it is the book one process gets from both ranks' batches together
    q = NormEmaQuantizer(16, 8, decay=0.5, restart_after=3, seed=5).train()
    for step in range(8):
        both = [torch.randn(64, 8, generator=torch.Generator().manual_seed(100 * r + step)) for r in range(2)]
        q(torch.cat(both))
    torch.testing.assert_close(a["codebook"], q.codebook, atol=1e-5, rtol=0)


def test_the_codebook_stays_fp32_and_lookups_exact_under_bf16():
    """A blanket cast (`.bfloat16()`, `.half()`) leaves the codebook and its EMA statistics in fp32,
    and a lookup under bf16 autocast still ranks two codes whose cosines differ by 2e-4 (both
    round to 1.0 in bf16, where the first would win the tie)."""
    quantizer = NormEmaQuantizer(2, 8, decay=0.99).bfloat16()
    for name in NormEmaQuantizer.FP32_STATE:
        assert getattr(quantizer, name).dtype == torch.float32, name
    assert quantizer.half().codebook.dtype == torch.float32 and quantizer.last_used.dtype == torch.long
    first, second, z = torch.zeros(8), torch.zeros(8), torch.zeros(1, 8)
    first[0] = second[0] = z[0, 0] = 1.0
    second[1], z[0, 1] = 0.05, 0.03
    quantizer.codebook.copy_(torch.nn.functional.normalize(torch.stack([first, second]), dim=-1))
    assert int(quantizer.lookup(z)) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert int(quantizer.lookup(z.bfloat16())) == 1
        out = quantizer.train()(z.bfloat16().expand(4, -1))
    assert out.codes.dtype == torch.float32 and out.indices.tolist() == [1, 1, 1, 1]
    assert quantizer.codebook.dtype == torch.float32 and float(quantizer.cluster_size[1]) == pytest.approx(0.04)
