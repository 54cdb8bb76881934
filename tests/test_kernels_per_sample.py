"""Adversarial checks of the rollout's per-sample query-row chain (one program per sample through its workspace row).

``_sample_query_kernel`` fuses the heads of a sample's layer into its fp32 workspace row in flat tiles of
``SAMPLE_BLOCK = 4096`` entries, picks the threshold key by a radix select over that row (the top byte's histogram
from the fusion pass, then three passes of 8 bits), finds the flat index of the last dropped tie with one more pass
over the tiles, and reads the row back for the chain step. The inputs here aim at each of those steps: keys that
differ in one byte only, with the target rank at a histogram bin's edge; ties spread thinly over many tiles; token
counts whose ``N*N`` leaves a short last tile; query rows that straddle a tile boundary; bad values in a later tile
only; signed zeros and subnormal fused values; low-precision maps and every head fusion at the ``N`` where the chain is
the default on a CPU (``SMALL_N < N <= SAMPLE_N_MAX``).

Most tests read an earlier layer through every row: the last layer is all ones with nothing discarded, so
``v = (1 + e_q) / (N + 1)`` weighs every row of the layer below, and an entry dropped or kept wrongly there moves the
result by far more than the tolerance. Every test compares with :func:`attnselect.functional.rollout`.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import attnselect.kernels as K
from attnselect import functional as F

pytestmark = pytest.mark.kernels

TILE = 4096  # SAMPLE_BLOCK, the flat tile of the per-sample kernel


def _rollout_module():
    return importlib.import_module("attnselect.kernels.rollout")  # the module, not the package's entry point


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ratio_for(count: int, n: int) -> float:
    """A discard ratio whose ``floor(ratio * N * N)`` (the reference's arithmetic) is exactly ``count``."""
    ratio = count / (n * n)
    while math.floor(n * n * ratio) < count:
        ratio = math.nextafter(ratio, 2.0)
    assert math.floor(n * n * ratio) == count and ratio <= 1.0
    return ratio


def _assert_rollout_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    # tight enough that one entry dropped or kept wrongly shows
    assert out.shape == ref.shape and out.dtype == ref.dtype == torch.float32
    assert torch.equal(out == 0, ref == 0)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-8)


def _through_every_row(target: torch.Tensor, ratio: float, query: torch.Tensor, **kw) -> None:
    """``target`` ([B,H,N,N] or [B,N,N]) as the earlier of two layers, read through every row (see the docstring)."""
    n = target.shape[-1]
    ones = torch.ones(target.shape[0], n, n, device=target.device, dtype=target.dtype)
    kw = {"discard_ratio": [ratio, 0.0], "query": query, **kw}
    _assert_rollout_equal(K.rollout([target, ones], **kw), F.rollout([target, ones], **kw))


def _from_keys(keys: torch.Tensor) -> torch.Tensor:
    """fp32 values with the given (non-negative int32) bit patterns: the kernel's keys."""
    return keys.to(torch.int32).view(torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# phase 2: the radix select over the workspace row
# --------------------------------------------------------------------------------------------------------------------
def test_radix_select_keys_differing_in_one_byte(device: str, force_chain) -> None:
    # keys built byte by byte from two choices each: every pass of the radix select sees several bins, whole groups
    # share the upper bytes and differ only lower down, and each key comes several times (ties at every level). The
    # counts put the target rank on the last and the first entry of each key's group, i.e. on both edges of every
    # histogram bin the select narrows into (cum == rem, and the rank just past it)
    force_chain("per-sample")
    n = 10
    g = _gen(0)
    keys = torch.zeros(n * n, dtype=torch.int64)
    for shift, pair in ((24, (0x3C, 0x3D)), (16, (0x00, 0x80)), (8, (0x00, 0xFF)), (0, (0x01, 0x02))):
        keys |= torch.tensor(pair)[torch.randint(0, 2, (n * n,), generator=g)] << shift
    a = _from_keys(keys).view(1, n, n).to(device)
    distinct, counts = torch.unique(keys, return_counts=True)
    assert len(distinct) >= 12 and int(counts.max()) >= 3
    edges = torch.cumsum(counts, 0).tolist()
    targets = sorted({c for e in edges for c in (e - 1, e) if 0 < c < n * n})
    query = torch.tensor([n - 1], device=device)
    for i, count in enumerate(targets):
        _through_every_row(a, _ratio_for(count, n), query, protect=("none", "entry0")[i % 2])


# --------------------------------------------------------------------------------------------------------------------
# phase 2: the pass for the flat index of the last dropped tie
# --------------------------------------------------------------------------------------------------------------------
def test_tie_index_with_ties_spread_thinly_over_many_tiles(device: str, force_chain) -> None:
    # N = 150: 22500 entries, five full tiles and a short sixth (20480..22499). Ten entries tie at the threshold
    # value, three tiles hold none of them, and the last ones end the map; four entries lie below it (entry 0 among
    # them). Each count puts the last dropped tie somewhere else: the count of ties seen in earlier tiles must carry
    # over tiles without any
    force_chain("per-sample")
    n = 150
    nn = n * n
    g = _gen(1)
    flat = 0.5 + torch.randint(0, 64, (nn,), generator=g).float() / 128  # in [0.5, 1): above the ties
    below = [0, 3, 9000, 22497]
    ties = [5, 17, 4095, 12288, 12289, 16000, 20480, 22000, 22498, 22499]
    flat[below] = 0.125
    flat[ties] = 0.25
    a = flat.view(1, n, n).to(device)
    query = torch.tensor([0], device=device)
    # rank among the ties -> the flat index of the last one dropped: 1 -> 5 (tile 0), 3 -> 4095 (the last of tile 0),
    # 4 -> 12288 (the first of tile 3, after two tiles without ties), 7 -> 20480 (the first of the short tile),
    # 9 -> 22498, 10 -> every tie (no pass needed); then inside the entries below: 2 -> flat 3 (entry 0 first)
    cases = [(4 + 1, "none"), (4 + 3, "entry0"), (4 + 4, "none"), (4 + 7, "entry0"), (4 + 9, "none")]
    cases += [(4 + 10, "none"), (2, "entry0"), (2, "none"), (4, "entry0")]
    for count, protect in cases:
        _through_every_row(a, _ratio_for(count, n), query, protect=protect)


def test_tie_index_in_the_last_of_ten_tiles(device: str, force_chain) -> None:
    # N = 200: 40000 entries (ten tiles, the last short). All but five entries tie; the last dropped tie is the
    # 39990th in flat order, reached after nine full tiles of ties (and the larger entries skipped on the way)
    force_chain("per-sample")
    n = 200
    a = torch.full((1, n, n), 0.25)
    a.view(-1)[[1, 4096, 20000, 39998, 39999]] = 0.5
    count = 39990
    _through_every_row(a.to(device), _ratio_for(count, n), torch.tensor([199], device=device), protect="entry0")


# --------------------------------------------------------------------------------------------------------------------
# the default chain on a CPU (SMALL_N < N <= SAMPLE_N_MAX): head fusions, low precision, the discard extremes
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "h", "head_fusion", "dtype"),
    [
        (129, 3, "mean", torch.float16),  # 16641 entries: four full tiles and one of 257
        (129, 2, "max", torch.bfloat16),
        (129, 4, "min", torch.float32),
        (256, 2, "mean", torch.bfloat16),  # 65536 entries: sixteen full tiles, no padding lanes
        (256, 1, "max", torch.float16),  # one head: no fusion at all
    ],
)
def test_default_chain_head_fusions_and_low_precision(
    device: str, force_chain, n: int, h: int, head_fusion: str, dtype: torch.dtype
) -> None:
    mod = _rollout_module()
    if device == "cpu":  # no SM count to wait for: one program per sample from one sample on
        assert mod.query_chain(1, n, torch.device(device)) == "per-sample"
    force_chain("per-sample")  # whatever the GPU's SM count
    g = _gen(n + h)
    # multiples of 1/8 (exact in fp16 and bf16, their means over heads correctly rounded): heavy ties after fusion
    maps = (torch.randint(1, 6, (2, h, n, n), generator=g).float() / 8).to(device, dtype)
    query = torch.tensor([n - 1, 31], device=device)
    _through_every_row(maps, 0.4, query, head_fusion=head_fusion, protect="entry0")


def test_discard_extremes_through_a_three_layer_chain(device: str, force_chain) -> None:
    # N = 140 (19600 entries, the last tile 3216 long); each layer at another extreme: one entry dropped (the
    # padding lanes of the short tile must not count as keys below it), all but one, everything, nothing
    force_chain("per-sample")
    n = 140
    nn = n * n
    g = _gen(2)
    x, y = ((torch.randint(1, 6, (2, 2, n, n), generator=g).float() / 8).to(device) for _ in range(2))
    ones = torch.ones(2, n, n, device=device)
    query = torch.tensor([n - 1, 70], device=device)
    for ratios, protect in (([1 / nn, (nn - 1) / nn, 0.0], "none"), ([(nn - 1) / nn, 1.0, 1 / nn], "entry0")):
        kw = {"discard_ratio": ratios, "protect": protect, "query": query, "head_fusion": "max"}
        _assert_rollout_equal(K.rollout([x, y, ones], **kw), F.rollout([x, y, ones], **kw))


def test_query_rows_straddling_tile_boundaries(device: str, force_chain) -> None:
    # the last layer's query row is read back from the workspace row: at N = 129 rows 31, 63, 95 and 127 each cross
    # a tile boundary (4096, 8192, 12288, 16384); the unique smallest entry sits on the second, the unique largest on
    # the first; rows given as int32, the map a slice of a padded buffer (strides not those of a contiguous map)
    force_chain("per-sample")
    n = 129
    nn = n * n
    g = _gen(3)
    big = torch.zeros(3, 4, n, n + 5)
    big[:, :, :, 2 : n + 2] = torch.randint(2, 6, (3, 4, n, n), generator=g).float() / 8
    maps = big.to(device)[1:, 1:3, :, 2 : n + 2]  # [2,2,N,N], stride(-2) = N + 5: copied to a contiguous map
    maps[:, :, 0, 0] = 1 / 16  # entry 0 among the smallest: protect decides
    maps[:, :, 31, 4096 - 31 * n] = 1.0  # flat 4096: the first entry of tile 1
    maps[:, :, 63, 8191 - 63 * n] = 1 / 32  # flat 8191: the last entry of tile 1
    assert not maps.is_contiguous()
    for rows in (torch.tensor([0, 31], dtype=torch.int32), torch.tensor([63, 95], dtype=torch.int32)):
        query = rows.to(device)
        for ratio, protect in ((1 / nn, "none"), (0.5, "entry0"), ((nn - 1) / nn, "none")):
            kw = {"discard_ratio": ratio, "protect": protect, "query": query}
            _assert_rollout_equal(K.rollout([maps], **kw), F.rollout([maps.contiguous()], **kw))
    query = torch.tensor([127, 128], dtype=torch.int32, device=device)  # row 128 ends in the short last tile
    kw = {"discard_ratio": 0.5, "protect": "none", "query": query}
    _assert_rollout_equal(K.rollout([maps], **kw), F.rollout([maps.contiguous()], **kw))


# --------------------------------------------------------------------------------------------------------------------
# phase 1: the checks of every tile, signed zeros and subnormal fused values
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layer", "head", "flat", "value", "head_fusion"),
    [
        (0, 0, 10, float("nan"), "mean"),  # in the first of two tiles only: the finding must outlive the second
        (0, 1, 65 * 65 - 1, -1.0, "mean"),  # the last entry of the short second tile: a negative mean
        (1, 2, TILE, float("inf"), "min"),  # the last layer, a later head: the minimum hides it, the check must not
        (0, 1, 4200, float("-inf"), "max"),  # hidden by the maximum: the reference accepts it, so must the kernel
    ],
)
def test_bad_values_in_either_tile(
    device: str, force_chain, layer: int, head: int, flat: int, value: float, head_fusion: str
) -> None:
    force_chain("per-sample")
    n = 65  # 4225 entries: a full tile and one of 129
    maps = [(torch.randint(1, 6, (2, 3, n, n), generator=_gen(i)).float() / 8).to(device) for i in range(2)]
    maps[layer][1, head].view(-1)[flat] = value
    query = torch.tensor([0, n - 1], device=device)
    kw = {"discard_ratio": 0.3, "head_fusion": head_fusion, "query": query}
    try:
        ref = F.rollout(maps, **kw)
    except ValueError:
        with pytest.raises(ValueError, match=r"finite|non-negative"):
            K.rollout(maps, **kw)
            K.check_errors()
        K.check_errors()
        assert value != float("-inf")  # the one case the reference accepts
        return
    assert value == float("-inf")
    _assert_rollout_equal(K.rollout(maps, **kw), ref)
    K.check_errors()


@pytest.mark.parametrize(("head_fusion", "heads"), [("mean", 3), ("max", 3), ("min", 3), ("mean", 1)])
def test_signed_zeros_and_subnormal_fused_values(device: str, force_chain, head_fusion: str, heads: int) -> None:
    # each sample's query row holds its map's smallest fused values: zeros of both signs (one key: ties broken by
    # flat index) and fp32 subnormals, whose means over 3 heads are rounded in the subnormal range (a flush to zero, as
    # an approximate or ftz division does, would merge them with the zeros). Every other entry is at least 1/4, so
    # each count up to N drops entries of the query row only, and v = (A_d[q] + e_q) / s_q is zero exactly where it
    # did. fp32 maps: the Triton interpreter (3.8) converts bf16 subnormals to fp32 wrongly, so bf16 would test it
    force_chain("per-sample")
    n = 20
    g = _gen(4 + heads)
    tiny = torch.tensor([0.0, -0.0, 2.0**-130, 3 * 2.0**-140, 5 * 2.0**-134, 2.0**-126])
    maps = torch.randint(1, 3, (2, heads, n, n), generator=g).float() / 4
    query = torch.tensor([0, n - 1])  # row 0 holds entry 0, among the smallest: protect decides its fate
    for b, q in enumerate(query.tolist()):
        maps[b, :, q] = tiny[torch.randint(0, len(tiny), (heads, n), generator=g)]
    maps, query = maps.to(device), query.to(device)
    assert bool(torch.signbit(maps[maps == 0]).any())
    for i, count in enumerate(range(1, n + 1, 3)):
        kw = {"discard_ratio": _ratio_for(count, n), "head_fusion": head_fusion, "query": query}
        kw["protect"] = ("none", "entry0")[i % 2]
        _assert_rollout_equal(K.rollout([maps], **kw), F.rollout([maps], **kw))


# --------------------------------------------------------------------------------------------------------------------
# head offsets past 2**31 elements (every chain shares the head loop of `_fused`), on the chains N = 4 takes
# --------------------------------------------------------------------------------------------------------------------
def test_head_offsets_past_int32(device: str) -> None:
    if device != "cpu":
        pytest.skip("checked on the CPU: on a GPU the layout would take 8 GiB of device memory")
    n, h, stride_h = 4, 3, 2**30
    base = 2**31  # the map's offset in its storage: the wrapped read of head 2 lands at element 0, still ours
    try:  # 8 GiB of address space, a few pages of it touched
        store = torch.empty(base + 2 * stride_h + n * n, dtype=torch.float16)
    except RuntimeError:
        pytest.skip("cannot reserve 8 GiB of address space here")
    heads = torch.softmax(torch.randn(h, n, n, generator=_gen(5)), -1).half()
    for i in range(h):
        store[base + i * stride_h : base + i * stride_h + n * n] = heads[i].flatten()
    store[: n * n] = 0.0  # what the wrapped offset reads instead of head 2
    x = store.as_strided((1, h, n, n), (0, stride_h, n, 1), base)
    assert torch.equal(x[0], heads)
    for query in (None, 0):
        out = K.rollout([x], discard_ratio=0.0, query=query)
        torch.testing.assert_close(out, F.rollout([x], discard_ratio=0.0, query=query), rtol=1e-5, atol=1e-6)
