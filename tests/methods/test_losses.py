"""The contrastive losses: single-process maths against the formulas written out, and negatives
gathered across two gloo ranks equal to the single-process loss of the concatenated batch."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from raymim.methods.losses import (
    cross_level_infonce,
    distributed_world,
    info_nce,
    multi_positive_info_nce,
    nt_xent,
    symmetric_ce,
)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def test_nt_xent_is_the_simclr_formula():
    torch.manual_seed(0)
    z1, z2, tau = torch.randn(3, 5), torch.randn(3, 5), 0.3
    views = list(z1) + list(z2)  # 2N views, the positive of a is a +- N
    n = 3
    terms = []
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        den = sum(math.exp(_cos(views[a], views[b]) / tau) for b in range(2 * n) if b != a)
        terms.append(-math.log(math.exp(_cos(views[a], views[pos]) / tau) / den))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert nt_xent(z1[:1], z2[:1], tau).item() == 0.0  # one pair: no negatives


def test_info_nce_is_the_symmetric_clip_formula():
    torch.manual_seed(1)
    a, b, tau = torch.randn(4, 6), torch.randn(4, 6), 0.2
    s = [[_cos(a[i], b[j]) / tau for j in range(4)] for i in range(4)]
    rows = [-s[i][i] + math.log(sum(math.exp(v) for v in s[i])) for i in range(4)]
    cols = [-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(4))) for j in range(4)]
    expected = 0.5 * (sum(rows) / 4 + sum(cols) / 4)
    assert info_nce(a, b, tau).item() == pytest.approx(expected, rel=1e-5)
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / tau
    assert symmetric_ce(logits).item() == pytest.approx(expected, rel=1e-5)
    # Only same-block pairs allowed: the loss of each block alone, averaged over rows.
    allowed = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    blocks = [symmetric_ce(logits[idx][:, idx]) for idx in ([0, 2], [1, 3])]
    assert info_nce(a, b, tau, allowed).item() == pytest.approx(sum(blocks).item() / 2, rel=1e-5)


def test_multi_positive_info_nce_formula_and_left_out_queries():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0], [1.0, 2.0, 0.0]])
    positive = torch.tensor([[1, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=torch.bool)  # query 2: all positives
    lse = torch.logsumexp
    expected = [lse(logits[0], 0) - lse(logits[0, :2], 0), lse(logits[1], 0) - logits[1, 2]]
    got = multi_positive_info_nce(logits, positive)
    assert got.item() == pytest.approx(float(sum(expected)) / 2, rel=1e-6)  # query 2 left out
    assert multi_positive_info_nce(logits[2:], positive[2:]).item() == 0.0  # nothing to tell apart


def test_cross_level_infonce_formula():
    torch.manual_seed(2)
    context, tokens, positive, tau = torch.randn(2, 4), torch.randn(2, 5, 4), torch.tensor([3, 0]), 0.2
    terms = []
    for m in range(2):
        s = [_cos(context[m], tokens[m, j]) / tau for j in range(5)]
        terms.append(-s[int(positive[m])] + math.log(sum(math.exp(v) for v in s)))
    assert cross_level_infonce(context, tokens, positive, tau).item() == pytest.approx(sum(terms) / 2, rel=1e-5)


def test_gathering_is_a_no_op_without_a_process_group():
    torch.manual_seed(3)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    assert distributed_world() == 1
    assert torch.equal(nt_xent(z1, z2, 0.2, gather_distributed=True), nt_xent(z1, z2, 0.2, gather_distributed=False))
    assert torch.equal(info_nce(z1, z2, 0.2, gather_distributed=True), info_nce(z1, z2, 0.2))


# ---- two gloo ranks on the CPU -------------------------------------------------------------------

WORLD, LOCAL, DIM, TAU = 2, 3, 8, 0.25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(WORLD * LOCAL, DIM, generator=g), torch.randn(WORLD * LOCAL, DIM, generator=g)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        a, b = _global_inputs()
        results = {}
        for name, fn in (("nt_xent", nt_xent), ("info_nce", info_nce)):
            x = a[rank * LOCAL:(rank + 1) * LOCAL].clone().requires_grad_(True)
            y = b[rank * LOCAL:(rank + 1) * LOCAL].clone().requires_grad_(True)
            loss = fn(x, y, TAU)  # gather_distributed=None: on, since the world size is 2
            loss.backward()
            local_only = fn(x.detach(), y.detach(), TAU, gather_distributed=False)
            results[name] = {"loss": loss.detach(), "local": local_only, "gx": x.grad, "gy": y.grad}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["nt_xent", "info_nce"])
def test_gathered_negatives_on_two_ranks_equal_the_concatenated_batch(name: str, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt")[name] for r in range(WORLD)]
    a, b = (t.clone().requires_grad_(True) for t in _global_inputs())
    fn = nt_xent if name == "nt_xent" else info_nce
    whole = fn(a, b, TAU)
    whole.backward()
    # DDP averages the ranks' gradients, i.e. optimises the mean of the ranks' losses: that mean is
    # the loss of the concatenated batch, and its gradient is the concatenated batch's gradient.
    mean = sum(r["loss"] for r in ranks) / WORLD
    assert mean.item() == pytest.approx(whole.item(), rel=1e-5)
    # the gathered negatives did change each rank's loss
    assert not any(r["loss"].item() == pytest.approx(r["local"].item(), rel=1e-3) for r in ranks)
    for rank, r in enumerate(ranks):
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        # Each rank's local inputs get the gradient of every rank's loss; averaged over the ranks
        # (DDP) that is the single-process gradient of the whole batch's loss.
        assert r["gx"] is not None and r["gx"].abs().sum() > 0
        assert torch.allclose(r["gx"] / WORLD, a.grad[rows], atol=1e-6, rtol=1e-4)
        assert torch.allclose(r["gy"] / WORLD, b.grad[rows], atol=1e-6, rtol=1e-4)
