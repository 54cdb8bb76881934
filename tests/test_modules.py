"""MultiLayerRollout, AdaptiveTokenScheduler, pooling, TokenAdapter and AttentiveBank."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import attnselect as asel
from attnselect import functional as F


def maps_for(b, n, layers, h=None, seed=0, causal=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        shape = (b, n, n) if h is None else (b, h, n, n)
        logits = torch.randn(shape, generator=g)
        if causal:
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.softmax(logits, -1))
    return out


# ---------------------------------------------------------------------------------------------------- import
def test_import_is_lean():
    code = (
        "import sys, attnselect, attnselect.functional; "
        "bad = [m for m in ('triton', 'transformers', 'open_clip', 'timm') if m in sys.modules]; "
        "import torch; assert not torch.cuda.is_initialized(), 'cuda initialised'; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names():
    for name in asel.__all__:
        assert getattr(asel, name) is not None


# ---------------------------------------------------------------------------------------------------- rollout module
def test_resolve_layers():
    assert asel.resolve_layers(("middle", "late"), 12) == (4, 11)
    assert asel.resolve_layers(("early", "middle", "late"), 24) == (0, 8, 23)
    assert asel.resolve_layers([-1, 0, 0], 6) == (0, 5)
    assert asel.MultiLayerRollout().resolve_layers(12) == (4, 11)
    with pytest.raises(ValueError, match="layers"):
        asel.resolve_layers(["penultimate"], 12)
    with pytest.raises(ValueError, match="layers"):
        asel.resolve_layers([12], 12)
    with pytest.raises(ValueError, match="layers"):
        asel.MultiLayerRollout(layers=("mid",))


def test_module_picks_layers_from_sequence_and_mapping():
    maps = maps_for(2, 9, 12, h=3)
    mars = asel.MultiLayerRollout()
    expected = F.rollout([maps[4], maps[11]], discard_ratio=0.25)
    torch.testing.assert_close(mars(maps), expected)
    torch.testing.assert_close(mars({4: maps[4], 11: maps[11]}), expected)
    torch.testing.assert_close(mars({i: m for i, m in enumerate(maps)}, num_layers=12), expected)
    torch.testing.assert_close(mars(maps, query=torch.tensor([0, 3])), expected[torch.arange(2), torch.tensor([0, 3])])
    with pytest.raises(ValueError, match="layer"):
        mars({4: maps[4]}, num_layers=12)
    assert "discard_ratio=0.25" in repr(mars)


# ---------------------------------------------------------------------------------------------------- scheduler
@pytest.mark.parametrize(
    ("n", "expected"), [(192, [124, 121, 109, 96, 96]), (75, [48, 47, 42, 37, 37])], ids=["image", "text"]
)
def test_ats_reference_values(n, expected):
    ats = asel.AdaptiveTokenScheduler()
    assert [ats.num_tokens(n, step=t) for t in (1, 145, 725, 1450, 5000)] == expected
    assert ats.num_tokens(n, step=0) == expected[0]  # t is clamped to [1, T]


@pytest.mark.parametrize("schedule", ["exp", "linear", "cosine", "fixed"])
def test_ats_monotone_and_endpoints(schedule):
    ats = asel.AdaptiveTokenScheduler(schedule=schedule, total_steps=100)
    ks = [ats.num_tokens(192, step=t) for t in range(0, 130)]
    assert all(a >= b for a, b in itertools.pairwise(ks))
    assert ks[-1] == 96
    if schedule != "fixed":
        assert ks[1] in (124, 123)
    ratios = [ats.ratio(t) for t in range(1, 101)]
    assert all(a >= b for a, b in itertools.pairwise(ratios))


def test_ats_counter_and_resume():
    ats = asel.AdaptiveTokenScheduler(total_steps=10)
    seq = []
    for _ in range(6):
        ats.step()
        seq.append(ats.num_tokens(192))
    state = ats.state_dict()
    for _ in range(6):
        ats.step()
        seq.append(ats.num_tokens(192))
    resumed = asel.AdaptiveTokenScheduler(total_steps=10)
    resumed.load_state_dict(state)
    assert resumed.current_step == 6
    tail = []
    for _ in range(6):
        resumed.step()
        tail.append(resumed.num_tokens(192))
    assert tail == seq[6:]
    # the bank's state dict carries the scheduler's counter
    bank = asel.AttentiveBank(scheduler=ats)
    other = asel.AttentiveBank(scheduler=asel.AdaptiveTokenScheduler(total_steps=10))
    other.load_state_dict(bank.state_dict())
    assert other.scheduler.current_step == 12


def test_ats_epoch_granularity():
    ats = asel.AdaptiveTokenScheduler(total_steps=30, granularity="epoch", steps_per_epoch=10)
    ks = [ats.num_tokens(192, step=t) for t in range(1, 41)]
    assert len(set(ks[:10])) == 1 and len(set(ks[10:20])) == 1 and ks[9] != ks[10]
    by_step = asel.AdaptiveTokenScheduler(total_steps=30)
    assert ks[0] == by_step.num_tokens(192, step=1)  # epoch 0 -> t = 0, clamped to 1
    assert ks[10] == by_step.num_tokens(192, step=10) and ks[20] == by_step.num_tokens(192, step=20)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rho_start=1.5),
        dict(rho_end=0.0),
        dict(total_steps=0),
        dict(schedule="step"),
        dict(granularity="batch"),
        dict(granularity="epoch"),
    ],
)
def test_ats_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs)) if "granularity" not in kwargs else "granularity|steps"):
        asel.AdaptiveTokenScheduler(**kwargs)


# ---------------------------------------------------------------------------------------------------- pooling
def gpo_loop_reference(pool: asel.GPOPool, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample GPO without packing: GRU over the sample's own ranks only."""
    outs = []
    for i in range(tokens.shape[0]):
        x = tokens[i][mask[i]]  # [L, D]
        length = x.shape[0]
        pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
        freq = torch.arange(0, pool.d_pe, 2, dtype=torch.float32)
        div = torch.exp(freq * (-torch.log(torch.tensor(1e4)) / pool.d_pe))
        pe = torch.zeros(length, pool.d_pe)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        out, _ = pool.gru(pe.unsqueeze(0))
        out = (out[..., : pool.d_hidden] + out[..., pool.d_hidden :]) / 2
        w = torch.softmax(pool.linear(out).squeeze(-1).squeeze(0) / 0.1, 0)
        outs.append((x.sort(dim=0, descending=True).values * w.unsqueeze(-1)).sum(0))
    return torch.stack(outs)


def test_gpo_matches_per_sample_reference():
    torch.manual_seed(0)
    pool = asel.GPOPool(d_pe=8, d_hidden=6)
    tokens = torch.randn(3, 7, 5)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 1, 0]]).bool()
    torch.testing.assert_close(pool(tokens, mask), gpo_loop_reference(pool, tokens, mask), rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), k=st.integers(1, 9), seed=st.integers(0, 1000))
def test_pools_padding_inert_and_permutation_invariant(b, k, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tokens = torch.randn(b, k, 6, generator=g)
    mask = torch.rand(b, k, generator=g) < 0.6
    mask[:, 0] = True
    poisoned = torch.where(mask.unsqueeze(-1), tokens, torch.randn(b, k, 6, generator=g) * 100)
    perm = torch.stack([torch.randperm(k, generator=g) for _ in range(b)])
    permuted = tokens.gather(1, perm.unsqueeze(-1).expand(-1, -1, 6))
    perm_mask = mask.gather(1, perm)
    for pool in (asel.GPOPool(d_pe=8, d_hidden=8), asel.MaxPool()):
        ref = pool(tokens, mask)
        torch.testing.assert_close(pool(poisoned, mask), ref)
        torch.testing.assert_close(pool(permuted, perm_mask), ref, rtol=1e-5, atol=1e-6)


def test_gpo_weights_are_a_distribution_over_valid_ranks():
    pool = asel.GPOPool()
    with torch.no_grad():
        w = pool.rank_weights(torch.tensor([1, 4, 6]), 6)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    assert float(w[0, 1:].abs().max()) == 0.0 and float(w[1, 4:].abs().max()) == 0.0
    assert w[0, 0] == 1.0


# ---------------------------------------------------------------------------------------------------- adapter
def test_adapter_batch_statistics_ignore_padding():
    torch.manual_seed(0)
    adapter = asel.TokenAdapter(8, 12, hidden_dim=6).train()
    tokens = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    poisoned = torch.where(mask.unsqueeze(-1), tokens, torch.randn(2, 5, 8) * 50)
    a1 = adapter(tokens, mask)
    running = adapter.norm.running_mean.clone()
    a2 = adapter(poisoned, mask)
    torch.testing.assert_close(a1[mask], a2[mask])
    # statistics equal a plain BatchNorm over the valid tokens only
    bn = nn.BatchNorm1d(6).train()
    bn.load_state_dict({k: v for k, v in asel.TokenAdapter(8, 12, hidden_dim=6).norm.state_dict().items()})
    x = tokens / (tokens.norm(dim=-1, keepdim=True) + 1e-8)
    h = adapter.mlp_in(x)[mask]
    expected = adapter.fc(x)[mask] + adapter.mlp_out(torch.relu(bn(h)))
    torch.testing.assert_close(a1[mask], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(running, bn.running_mean)
    adapter.eval()
    e1, e2 = adapter(tokens, mask), adapter(poisoned, mask)
    torch.testing.assert_close(e1[mask], e2[mask])


def test_adapter_layer_norm_and_shapes():
    adapter = asel.TokenAdapter(16, 32, norm="layer")
    assert adapter(torch.randn(2, 4, 16)).shape == (2, 4, 32)
    with pytest.raises(ValueError, match="tokens"):
        adapter(torch.randn(2, 4, 15))
    with pytest.raises(ValueError, match="norm"):
        asel.TokenAdapter(4, 4, norm="group")


# ---------------------------------------------------------------------------------------------------- bank
def test_bank_image_selection_matches_functional():
    maps = maps_for(2, 193, 12, h=2, seed=1)
    tokens = torch.randn(2, 193, 16)
    bank = asel.AttentiveBank(ratio=0.4)
    out = bank(tokens, maps)
    assert out.k == 76  # int(192 * 0.4), as the published inference
    sal = F.rollout([maps[4], maps[11]], query=0)
    torch.testing.assert_close(out.saliency, sal)
    valid = torch.ones(2, 193, dtype=torch.bool)
    valid[:, 0] = False
    idx, _ = F.select_topk(sal, 76, valid=valid)
    assert torch.equal(out.indices, idx)
    assert not bool((out.indices == 0).any())
    torch.testing.assert_close(out.tokens, F.gather_tokens(tokens, idx))
    torch.testing.assert_close(out.embedding, out.tokens.amax(1))


def test_bank_with_scheduler_k():
    maps = maps_for(1, 193, 2, seed=2)
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0, 1)), scheduler=asel.AdaptiveTokenScheduler())
    assert bank(torch.randn(1, 193, 8), maps, step=1).k == 124
    assert bank(torch.randn(1, 193, 8), maps, step=1450).k == 96


def test_bank_text_eos_padding_and_exclusions():
    b, n = 3, 12
    maps = maps_for(b, n, 2, h=2, seed=3, causal=True)
    eos = torch.tensor([4, 11, 7])
    valid = torch.arange(n).unsqueeze(0) <= eos.unsqueeze(1)
    tokens = torch.randn(b, n, 8)
    bank = asel.AttentiveBank(
        rollout=asel.MultiLayerRollout(layers=(0, 1)),
        ratio=0.5,
        adapter=asel.TokenAdapter(8, 10, hidden_dim=4),
        pool="gpo",
    )
    exclude = torch.stack([torch.zeros_like(eos), eos], 1)
    inputs = [m.clone() for m in maps], tokens.clone()
    out = bank(tokens, maps, query=eos, valid=valid, exclude=exclude)
    assert out.k == 5  # int((12 - 2) * 0.5)
    for i in range(b):
        kept = out.indices[i][out.mask[i]].tolist()
        assert 0 not in kept and int(eos[i]) not in kept and all(j < eos[i] for j in kept)
        assert int(out.mask[i].sum()) == min(5, int(eos[i]) - 1)
    assert out.embedding.shape == (3, 10)
    assert all(torch.equal(a, c) for a, c in zip(inputs[0], maps)) and torch.equal(inputs[1], tokens)


def test_bank_bad_input():
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0,)))
    maps = maps_for(2, 9, 1)
    with pytest.raises(ValueError, match="tokens"):
        bank(torch.randn(2, 8, 4), maps)
    with pytest.raises(ValueError, match="tokens"):
        bank(torch.randn(2, 9), maps)
    with pytest.raises(ValueError, match="exclude"):
        bank(torch.randn(2, 9, 4), maps, exclude=[9])
    with pytest.raises(ValueError, match="valid"):
        bank(torch.randn(2, 9, 4), maps, valid=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="ratio"):
        asel.AttentiveBank(ratio=1.2)
    with pytest.raises(ValueError, match="pool"):
        asel.AttentiveBank(pool="mean")


def test_module_reads_its_layers_from_a_full_capture_mapping():
    maps = {i: torch.softmax(torch.randn(2, 9, 9), -1) for i in range(12)}
    expected = F.rollout([maps[4], maps[11]], query=0)
    for layers in [(4, 11), ("middle", "late")]:
        torch.testing.assert_close(asel.MultiLayerRollout(layers=layers)(maps, query=0), expected)
    with pytest.raises(ValueError, match="num_layers"):  # names against a partial mapping that is not the capture
        asel.MultiLayerRollout()({1: maps[1], 4: maps[4], 11: maps[11]}, query=0)


def test_masked_batch_norm_mask_checks():
    bn = asel.MaskedBatchNorm1d(3).train()
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="mask"):
        bn(x, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        bn(x, torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        bn(x, torch.ones(2, 4))
    assert int(bn.num_batches_tracked) == 0  # nothing was folded into the running statistics


def test_bank_text_default_excludes_sos_and_eos():
    b, n = 2, 77
    maps = maps_for(b, n, 1, seed=4, causal=True)
    eos = torch.tensor([20, 76])
    valid = torch.arange(n).unsqueeze(0) <= eos.unsqueeze(1)
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0,)), ratio=0.4)
    out = bank(torch.randn(b, n, 8), maps, query=eos, valid=valid)
    assert out.k == 30  # int(75 * 0.4): the published text count
    kept = out.indices[out.mask]
    assert not bool((kept == 0).any()) and int(out.mask[0].sum()) == 19  # words 1..19 of the short caption


# ---------------------------------------------------------------------------------------------------- adversarial
def test_named_layers_against_an_exact_capture_that_looks_like_a_full_one():
    """A capture of exactly layers {0, 1} of a deeper host must not be read as a 2-layer host (middle would be 0)."""
    maps = maps_for(2, 5, 3, seed=5)  # a 3-layer host: early = 0, middle = 1
    mars = asel.MultiLayerRollout(layers=("early", "middle"))
    expected = F.rollout([maps[0], maps[1]])
    torch.testing.assert_close(mars({0: maps[0], 1: maps[1]}, num_layers=3), expected)
    with pytest.raises(ValueError, match="num_layers"):
        mars({0: maps[0], 1: maps[1]})
    # unambiguous cases keep working without the depth
    torch.testing.assert_close(asel.MultiLayerRollout()({0: maps[0], 1: maps[1]}), expected)  # 2-layer host: (0, 1)
    torch.testing.assert_close(mars({0: maps[0], 2: maps[2]}), F.rollout([maps[0], maps[2]]))


def test_rollout_module_numbers_from_numpy_and_bad_ratio_type():
    maps = maps_for(2, 6, 12, seed=6)
    mars = asel.MultiLayerRollout(discard_ratio=np.float32(0.25))
    torch.testing.assert_close(mars(maps, query=np.int64(3)), asel.MultiLayerRollout()(maps, query=3))
    with pytest.raises(TypeError, match="discard_ratio"):
        asel.MultiLayerRollout(discard_ratio=None)


def test_ats_integer_like_steps_and_argument_checks():
    ats = asel.AdaptiveTokenScheduler()
    assert ats.num_tokens(np.int64(192), step=np.int64(725)) == 109
    assert ats.num_tokens(192, step=torch.tensor(1450)) == 96
    with pytest.raises(TypeError, match="step"):
        ats.num_tokens(192, step=1.5)
    with pytest.raises(ValueError, match="step"):
        ats.num_tokens(192, step=-1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        asel.AdaptiveTokenScheduler(steps_per_epoch=0)


def test_ats_resume_from_a_saved_checkpoint(tmp_path):
    """Resuming through torch.save / torch.load (weights_only) continues the schedule at the boundaries."""
    ats = asel.AdaptiveTokenScheduler(total_steps=4)
    assert ats.num_tokens(192) == ats.num_tokens(192, step=1) == int(192 * 0.65 * (0.5 / 0.65) ** 0.25)  # t=0 -> 1
    for _ in range(3):
        ats.step()
    torch.save(ats.state_dict(), tmp_path / "ats.pt")
    resumed = asel.AdaptiveTokenScheduler(total_steps=4)
    resumed.load_state_dict(torch.load(tmp_path / "ats.pt", weights_only=True))
    ks = []
    for _ in range(3):
        resumed.step()
        ks.append(resumed.num_tokens(192))
    assert resumed.current_step == 6 and ks == [96, 96, 96]  # t = 4 = T, then beyond T
    assert ats.num_tokens(192) == int(192 * 0.65 * (0.5 / 0.65) ** 0.75)
    with pytest.raises(ValueError, match="step"):
        resumed.load_state_dict({"_extra_state": {"step": -3}})


def test_gpo_argument_checks_and_empty_batch():
    with pytest.raises(ValueError, match="temperature"):
        asel.GPOPool(temperature=0.0)
    with pytest.raises(ValueError, match="d_hidden"):
        asel.GPOPool(d_hidden=0)
    out = asel.GPOPool(d_pe=4, d_hidden=4)(torch.randn(0, 3, 5), torch.ones(0, 3, dtype=torch.bool))
    assert out.shape == (0, 5)


def test_bank_errors_name_the_right_argument():
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0,)))
    maps = maps_for(2, 6, 1, seed=7)
    with pytest.raises(ValueError, match="exclude"):  # sample 0 excludes everything
        bank(torch.randn(2, 6, 4), maps, exclude=torch.tensor([[True] * 6, [False] * 6]))
    only_cls = torch.zeros(2, 6, dtype=torch.bool)
    only_cls[:, 0] = True  # the only valid token is the query, which is excluded
    with pytest.raises(ValueError, match=r"exclude .* and valid"):
        bank(torch.randn(2, 6, 4), maps, valid=only_cls)
    with pytest.raises(ValueError, match="tokens"):  # tokens on another device than the maps
        bank(torch.randn(2, 6, 4, device="meta"), maps)


def test_ats_intermediate_values_of_each_schedule():
    # n = 192, T = 100, rho 0.65 -> 0.5, r = t / T:
    # linear: 192 * (0.65 - 0.15 r): r = 0.25 -> 117.6, 0.5 -> 110.4, 0.75 -> 103.2
    # cosine: 192 * (0.5 + 0.15 * (1 + cos(pi r)) / 2): 120.58, 110.4, 100.22
    # exp:    192 * 0.65 * (0.5 / 0.65) ** r: 116.88, 109.46, 102.51
    expected = {"linear": [117, 110, 103], "cosine": [120, 110, 100], "exp": [116, 109, 102]}
    for schedule, ks in expected.items():
        ats = asel.AdaptiveTokenScheduler(schedule=schedule, total_steps=100)
        assert [ats.num_tokens(192, step=t) for t in (25, 50, 75)] == ks, schedule
    assert asel.AdaptiveTokenScheduler(schedule="linear", total_steps=100).ratio(50) == pytest.approx(0.575)


@pytest.mark.parametrize("schedule", ["exp", "linear", "cosine", "fixed"])
def test_ats_keeps_at_least_one_token(schedule):
    # rho_end = 0.1: n * rho < 1 for n < 10, yet at least one token is always kept
    ats = asel.AdaptiveTokenScheduler(rho_start=0.3, rho_end=0.1, total_steps=10, schedule=schedule)
    assert [ats.num_tokens(n, step=10) for n in (1, 2, 5, 9)] == [1, 1, 1, 1]
    assert asel.AdaptiveTokenScheduler().num_tokens(1, step=1) == 1  # 0.65 * 1 rounds down to 0
