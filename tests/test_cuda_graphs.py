"""CUDA graphs capture the kernels' launch paths (no device-to-host read, no host-side decision on device data).

A graph is recorded once on static inputs, then replayed after new values are copied into them: the replayed outputs
must equal the reference on the new values. A read-back (``.item()``, ``.tolist()``, ``.cpu()``) during capture raises,
and a host-side decision taken on the first inputs would give wrong results on the second. The last test checks that
``torch.compile(mode="reduce-overhead")`` runs the selection path as a CUDA graph, with no skip.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import attnselect.kernels as K
from attnselect import functional as F

pytestmark = [pytest.mark.kernels, pytest.mark.gpu]


@pytest.fixture
def cuda() -> str:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (CUDA graphs)")
    if not K.kernels_enabled(torch.empty(0, device="cuda")):
        pytest.skip(K.explain(torch.empty(0, device="cuda")))
    return "cuda"


def _graph(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm ``fn`` up on a side stream (as CUDA graph capture requires), then record it once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _softmax_maps(b: int, h: int, n: int, layers: int, g: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(b, h, n, n, device="cuda", generator=g).softmax(-1).half() for _ in range(layers)]


@pytest.mark.parametrize("n", [77, 193, 577])
@pytest.mark.parametrize("query", [None, 0])
def test_rollout_replays(cuda: str, n: int, query: int | None) -> None:
    g = torch.Generator(device=cuda).manual_seed(n)
    b = 8 if n < 577 else 2
    static = _softmax_maps(b, 4, n, 2, g)
    graph, out = _graph(lambda: K.rollout(static, discard_ratio=0.25, query=query))
    for _ in range(2):
        fresh = _softmax_maps(b, 4, n, 2, g)
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        ref = F.rollout(fresh, discard_ratio=0.25, query=query)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,k", [(193, 96), (77, 37)])
def test_topk_gather_forward_and_backward_replay(cuda: str, n: int, k: int) -> None:
    g = torch.Generator(device=cuda).manual_seed(k)
    b, d = 16, 64
    scores = torch.rand(b, n, device=cuda, generator=g)
    tokens = torch.randn(b, n, d, device=cuda, generator=g).half().requires_grad_()
    grad_out = torch.randn(b, k, d, device=cuda, generator=g).half()

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices, _mask, gathered = K.select_topk_gather(scores, k, tokens)
        (grad,) = torch.autograd.grad(gathered, tokens, grad_out)
        return indices, gathered, grad

    graph, (indices, gathered, grad) = _graph(step)
    for _ in range(2):
        with torch.no_grad():
            scores.copy_(torch.rand(b, n, device=cuda, generator=g))
            tokens.copy_(torch.randn(b, n, d, device=cuda, generator=g))
            grad_out.copy_(torch.randn(b, k, d, device=cuda, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        ref_idx, _ = F.select_topk(scores, k)
        ref_tokens = tokens.detach().clone().requires_grad_()
        ref_gathered = F.gather_tokens(ref_tokens, ref_idx)
        (ref_grad,) = torch.autograd.grad(ref_gathered, ref_tokens, grad_out)
        assert torch.equal(indices, ref_idx)
        assert torch.equal(gathered, ref_gathered)
        torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("n,causal", [(193, False), (77, True), (577, False)])
def test_capture_replays(cuda: str, n: int, causal: bool) -> None:
    g = torch.Generator(device=cuda).manual_seed(n)
    b, h, d = 4, 4, 64
    q, k = (torch.randn(b, h, n, d, device=cuda, generator=g).half() for _ in range(2))
    scale = d**-0.5
    graph, out = _graph(lambda: K.attention_probs(q, k, scale=scale, causal=causal))
    for _ in range(2):
        q.copy_(torch.randn(b, h, n, d, device=cuda, generator=g))
        k.copy_(torch.randn(b, h, n, d, device=cuda, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, F.attention_probs(q, k, scale=scale, causal=causal), atol=1e-3, rtol=1e-3)


def test_compile_reduce_overhead_runs_the_selection_as_a_graph(cuda: str) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator(device=cuda).manual_seed(0)
    b, h, n, d, keep = 8, 4, 193, 64, 96

    def select(q: torch.Tensor, kk: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = q.shape[-1] ** -0.5
        maps = [K.attention_probs(q, kk, scale=scale), K.attention_probs(kk, q, scale=scale)]
        saliency = K.rollout(maps, discard_ratio=0.25, query=0)
        indices, _mask, gathered = K.select_topk_gather(saliency, keep, tokens)
        return indices, gathered.amax(dim=1)

    compiled = torch.compile(select, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # the graph is recorded on a later call than the first
        q, kk = (torch.randn(b, h, n, d, device=cuda, generator=g).half() for _ in range(2))
        tokens = torch.randn(b, n, 32, device=cuda, generator=g).half()
        indices, pooled = compiled(q, kk, tokens)
        ref_indices, ref_pooled = select(q, kk, tokens)
        assert torch.equal(indices, ref_indices)
        assert torch.equal(pooled, ref_pooled)
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])
