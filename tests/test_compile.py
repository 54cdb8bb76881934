"""``torch.compile(fullgraph=True)`` traces modules that call the kernels' custom ops (forward and backward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnselect.kernels as K
from attnselect import functional as F


class _SelectBank(nn.Module):
    """Capture -> rollout (query row) -> top-k + gather: the path a bank takes, through the gate."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, q: torch.Tensor, kk: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = q.shape[-1] ** -0.5
        maps = [K.attention_probs(q, kk, scale=scale), K.attention_probs(kk, q, scale=scale, head_fusion=None)]
        saliency = K.rollout(maps, discard_ratio=0.25, query=0)
        indices, _mask, gathered = K.select_topk_gather(saliency, self.k, tokens)
        return gathered.amax(dim=1), indices


def _reference(q: torch.Tensor, kk: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = q.shape[-1] ** -0.5
    maps = [F.attention_probs(q, kk, scale=scale), F.attention_probs(kk, q, scale=scale, head_fusion=None)]
    saliency = F.rollout(maps, discard_ratio=0.25, query=0)
    indices, _ = F.select_topk(saliency, k)
    return F.gather_tokens(tokens, indices).amax(dim=1), indices


@pytest.mark.kernels
def test_compile_fullgraph_traces_the_custom_ops() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not K.kernels_enabled(torch.empty(0, device=device)):
        pytest.skip(K.explain(torch.empty(0, device=device)))
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q, kk = (torch.randn(2, 2, 17, 16, generator=g).to(device) for _ in range(2))
    tokens = torch.randn(2, 17, 8, generator=g).to(device).requires_grad_()
    model = _SelectBank(k=6)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    pooled, indices = compiled(q, kk, tokens)
    ref_tokens = tokens.detach().clone().requires_grad_()
    ref_pooled, ref_indices = _reference(q, kk, ref_tokens, 6)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(pooled, ref_pooled)
    pooled.sum().backward()
    ref_pooled.sum().backward()
    torch.testing.assert_close(tokens.grad, ref_tokens.grad)
    # the custom ops are in the traced graph (opaque nodes), not a graph break around them
    explanation = torch._dynamo.explain(model)(q, kk, tokens)
    assert explanation.graph_break_count == 0
