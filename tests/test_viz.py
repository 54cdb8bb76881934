"""attnselect.viz: the data helpers against hand-computed values, and the figures render and follow their input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnselect as asel
from attnselect import functional as F
from attnselect import viz


def _pixels(fig) -> np.ndarray:
    return viz.figure_to_array(fig)


# --------------------------------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------------------------------
def test_patch_grid_scores_drops_prefix_and_lays_out_row_major():
    s = torch.arange(7.0)
    out = viz.patch_grid_scores(s, grid=(2, 3), num_prefix_tokens=1)
    assert torch.equal(out, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    # CLS + 4 registers before a 24x8 person-crop grid, batched
    s = torch.randn(3, 5 + 192)
    out = viz.patch_grid_scores(s, grid=(24, 8), num_prefix_tokens=5)
    assert out.shape == (3, 24, 8) and out.dtype == torch.float32
    assert torch.equal(out[1, 2, 3], s[1, 5 + 2 * 8 + 3])
    # no CLS (SigLIP): every token is a patch; a square grid is inferred
    s = torch.rand(16)
    assert torch.equal(viz.patch_grid_scores(s, num_prefix_tokens=0), s.view(4, 4))
    # numpy input, input never modified
    arr = np.arange(5.0)
    viz.patch_grid_scores(arr, grid=(2, 2))
    assert arr.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_patch_grid_scores_rejects_mismatched_layouts():
    with pytest.raises(ValueError, match="grid 24x8"):
        viz.patch_grid_scores(torch.rand(193), grid=(24, 8), num_prefix_tokens=5)
    with pytest.raises(ValueError, match="square"):
        viz.patch_grid_scores(torch.rand(193), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        viz.patch_grid_scores(torch.rand(10), grid=(3, 3), num_prefix_tokens=-1)
    with pytest.raises(ValueError, match=r"\[N\] or \[B,N\]"):
        viz.patch_grid_scores(torch.rand(2, 2, 5), grid=(2, 2))
    with pytest.raises(TypeError, match="saliency"):
        viz.patch_grid_scores([0.1, 0.2], grid=(1, 2), num_prefix_tokens=0)


def test_infer_grid():
    assert viz.infer_grid(196) == (14, 14)
    assert viz.infer_grid(192, image_size=(384, 128)) == (24, 8)
    assert viz.infer_grid(192, image_size=(128, 384)) == (8, 24)
    assert viz.infer_grid(7, image_size=(10, 70)) == (1, 7)
    with pytest.raises(ValueError, match="square"):
        viz.infer_grid(192)


def test_kept_patch_mask_hand_computed():
    # tokens: [CLS, p0..p5] on a 2x3 grid; keep CLS (ignored), p1, p5
    keep = viz.kept_patch_mask(torch.tensor([0, 2, 6]), grid=(2, 3), num_prefix_tokens=1)
    assert keep.tolist() == [[False, True, False], [False, False, True]]
    # the tail that select_topk repeats (mask False) never unsets or adds a patch
    keep = viz.kept_patch_mask(
        torch.tensor([[3, 4, 4, 4], [1, 2, 3, 3]]),
        grid=(2, 3),
        mask=torch.tensor([[True, True, False, False], [True, True, True, False]]),
    )
    assert keep.tolist() == [
        [[False, False, True], [True, False, False]],
        [[True, True, True], [False, False, False]],
    ]
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        viz.kept_patch_mask(torch.tensor([7]), grid=(2, 3))
    with pytest.raises(TypeError, match="integer"):
        viz.kept_patch_mask(torch.tensor([1.0]), grid=(2, 3))


def test_kept_patch_mask_matches_bank_selection():
    torch.manual_seed(0)
    maps = {1: torch.softmax(torch.randn(2, 25, 25), -1), 3: torch.softmax(torch.randn(2, 25, 25), -1)}
    out = asel.AttentiveBank(ratio=0.25, pool=None)(torch.randn(2, 25, 8), maps)
    keep = viz.kept_patch_mask(out.indices, grid=(4, 6), num_prefix_tokens=1, mask=out.mask)
    assert keep.shape == (2, 4, 6)
    assert keep.sum(dim=(1, 2)).tolist() == [out.k, out.k]
    flat = keep.reshape(2, -1)
    for b in range(2):
        assert sorted((flat[b].nonzero().squeeze(1) + 1).tolist()) == sorted(out.indices[b].tolist())


def test_query_row_saliency():
    attn = torch.softmax(torch.randn(3, 4, 9, 9), -1)
    fused = attn.mean(1)
    assert torch.allclose(viz.query_row_saliency(attn, 0), fused[:, 0])
    assert torch.allclose(viz.query_row_saliency(fused, 2), fused[:, 2])
    rows = torch.tensor([8, 0, 5])
    expect = torch.stack([fused[b, r] for b, r in enumerate(rows.tolist())])
    assert torch.allclose(viz.query_row_saliency(fused, rows), expect)
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        viz.query_row_saliency(fused, 9)


def test_attention_entropy_values():
    n = 6
    uniform = torch.full((2, n, n), 1.0 / n)
    onehot = torch.eye(n).expand(2, n, n)
    ent = viz.attention_entropy({3: uniform, 1: onehot})
    assert list(ent) == [1, 3]
    assert ent[1] == pytest.approx(0.0, abs=1e-6)
    assert ent[3] == pytest.approx(math.log(n), rel=1e-6)
    assert viz.attention_entropy([uniform], normalize=True) == {0: pytest.approx(1.0, rel=1e-6)}
    # two heads attending to different single keys: 0 per head, log 2 once the heads are averaged
    heads = torch.zeros(1, 2, 3, 3)
    heads[:, 0, :, 0] = 1.0
    heads[:, 1, :, 1] = 1.0
    assert viz.attention_entropy({0: heads})[0] == pytest.approx(0.0, abs=1e-6)
    assert viz.attention_entropy({0: heads}, head_fusion="mean")[0] == pytest.approx(math.log(2), rel=1e-6)
    # a fully masked row (all zeros) is left out of the mean; a causal map's row r has r + 1 keys
    causal = torch.tril(torch.ones(4, 4))
    causal = (causal / causal.sum(-1, keepdim=True)).unsqueeze(0)
    causal_with_pad = torch.cat([causal, torch.zeros(1, 1, 4)], dim=1)
    causal_with_pad = torch.cat([causal_with_pad, torch.zeros(1, 5, 1)], dim=2)
    expect = sum(math.log(r + 1) for r in range(4)) / 4
    assert viz.attention_entropy({0: causal})[0] == pytest.approx(expect, rel=1e-6)
    assert viz.attention_entropy({0: causal_with_pad})[0] == pytest.approx(expect, rel=1e-6)


def test_attention_entropy_rejects_bad_maps():
    with pytest.raises(ValueError, match="empty"):
        viz.attention_entropy({})
    with pytest.raises(ValueError, match="non-negative"):
        viz.attention_entropy({0: -torch.ones(1, 3, 3)})
    with pytest.raises(ValueError, match=r"\[B,N,N\]"):
        viz.attention_entropy({0: torch.ones(3, 3)})
    with pytest.raises(TypeError):
        viz.attention_entropy(torch.ones(1, 3, 3))  # a bare tensor is not a per-layer collection


def test_selection_frequency_counts_each_sample_once():
    assert viz.selection_frequency([torch.tensor([[1, 2], [2, 3]])], n_tokens=4).tolist() == [0.0, 0.5, 1.0, 0.5]
    # k differs between batches; duplicated tail entries count once; masked entries not at all
    batches = [torch.tensor([[0, 1, 1]]), torch.tensor([[2, 3], [1, 3]])]
    masks = [torch.tensor([[True, True, False]]), torch.tensor([[True, False], [True, True]])]
    freq = viz.selection_frequency(batches, n_tokens=4, masks=masks)
    assert torch.allclose(freq, torch.tensor([1 / 3, 2 / 3, 1 / 3, 1 / 3]))
    counter = viz.SelectionCounter(4).update(torch.tensor([0, 0, 3]))
    assert counter.counts.tolist() == [1, 0, 0, 1] and counter.num_samples == 1
    counter.reset()
    with pytest.raises(ValueError, match="update"):
        counter.frequency()
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        viz.selection_frequency(torch.tensor([[4]]), n_tokens=4)
    with pytest.raises(ValueError, match="masks has 1"):
        viz.selection_frequency([torch.tensor([[0]])] * 2, n_tokens=4, masks=[None])


def test_selection_frequency_matches_loop_reference():
    torch.manual_seed(1)
    n, total = 13, torch.zeros(13)
    batches = []
    for _ in range(4):
        scores = torch.rand(5, n)
        idx, _ = F.select_topk(scores, 4)
        batches.append(idx)
        for row in idx.tolist():
            for i in set(row):
                total[i] += 1
    assert torch.allclose(viz.selection_frequency(batches, n), total / 20)


def test_token_schedule_reference_values():
    ats = asel.AdaptiveTokenScheduler()
    steps, ks = viz.token_schedule(ats, 192, steps=[1, 145, 725, 1450, 5000])
    assert ks.tolist() == [124, 121, 109, 96, 96]
    assert viz.token_schedule(ats, 75, steps=[1, 145, 725, 1450, 5000])[1].tolist() == [48, 47, 42, 37, 37]
    steps, ks = viz.token_schedule(ats, 192)
    assert steps[0] == 0 and steps[-1] == int(1450 * 1.2) and np.all(np.diff(ks) <= 0)
    assert ats.current_step == 0  # the scheduler's own counter is untouched


def test_image_to_array():
    u8 = np.zeros((4, 5, 3), np.uint8)
    u8[0, 0] = 255
    arr = viz.image_to_array(u8)
    assert arr.shape == (4, 5, 3) and arr.dtype == np.float32 and arr[0, 0, 0] == 1.0
    normalised = torch.tensor([-2.0, 0.0, 2.0]).view(3, 1, 1).expand(3, 2, 2)
    arr = viz.image_to_array(normalised)
    assert arr.shape == (2, 2, 3) and arr.min() == 0.0 and arr.max() == 1.0
    assert viz.image_to_array(torch.rand(1, 3, 6, 4)).shape == (6, 4, 3)
    assert viz.image_to_array(np.ones((3, 3))).shape == (3, 3, 3)
    from PIL import Image

    assert viz.image_to_array(Image.new("L", (7, 2), 128)).shape == (2, 7, 3)
    with pytest.raises(ValueError, match="channels"):
        viz.image_to_array(np.zeros((4, 4, 2)))
    with pytest.raises(TypeError, match="image"):
        viz.image_to_array([[0.0]])


# --------------------------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------------------------
def test_plot_saliency_renders_and_follows_input(tmp_path):
    image = torch.rand(3, 96, 32)
    s1 = torch.rand(2, 1 + 24)
    s2 = s1.clone()
    s2[0, 5] += 3.0
    a = _pixels(viz.plot_saliency(image, s1, grid=(6, 4), num_prefix_tokens=1))
    b = _pixels(viz.plot_saliency(image, s1, grid=(6, 4), num_prefix_tokens=1))
    c = _pixels(viz.plot_saliency(image, s2, grid=(6, 4), num_prefix_tokens=1))
    d = _pixels(viz.plot_saliency(image, s2, grid=(6, 4), num_prefix_tokens=1, index=1))
    assert a.shape == c.shape and a.ndim == 3
    assert np.array_equal(a, b)  # deterministic
    assert not np.array_equal(a, c)  # sample 0 changed
    assert np.array_equal(d, _pixels(viz.plot_saliency(image, s1, grid=(6, 4), index=1)))  # sample 1 unchanged
    # image=None draws the grid alone; registers and no-CLS layouts
    viz.plot_saliency(None, torch.rand(5 + 16), grid=(4, 4), num_prefix_tokens=5)
    path = tmp_path / "sub" / "sal.png"
    viz.plot_saliency(image, torch.rand(16), num_prefix_tokens=0, save=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_kept_tokens_follows_indices():
    image = np.full((48, 32, 3), 0.5, np.float32)
    a = _pixels(viz.plot_kept_tokens(image, torch.tensor([1, 2, 3]), grid=(3, 2)))
    b = _pixels(viz.plot_kept_tokens(image, torch.tensor([1, 2, 4]), grid=(3, 2)))
    assert not np.array_equal(a, b)
    # a masked-out entry is not drawn: same picture as without it
    c = _pixels(
        viz.plot_kept_tokens(image, torch.tensor([1, 2, 4]), grid=(3, 2), mask=torch.tensor([True, True, False]))
    )
    d = _pixels(viz.plot_kept_tokens(image, torch.tensor([1, 2]), grid=(3, 2)))
    assert np.array_equal(c, d)
    viz.plot_kept_tokens(None, torch.tensor([[0, 1], [2, 3]]), grid=(2, 2), num_prefix_tokens=0, index=1)


def test_plot_attention_entropy_and_selection_frequency_follow_input():
    maps = {i: torch.softmax(torch.randn(1, 10, 10) * (i + 1), -1) for i in range(4)}
    a = _pixels(viz.plot_attention_entropy(maps, highlight=[1, 3]))
    ent = viz.attention_entropy(maps)
    assert np.array_equal(a, _pixels(viz.plot_attention_entropy(ent, highlight=[1, 3])))
    ent2 = dict(ent)
    ent2[2] += 0.5
    assert not np.array_equal(a, _pixels(viz.plot_attention_entropy(ent2, highlight=[1, 3])))
    viz.plot_attention_entropy({"image": ent, "text": ent2}, normalize=False)
    f1 = viz.selection_frequency(torch.tensor([[1, 2]]), 5)
    f2 = viz.selection_frequency(torch.tensor([[1, 3]]), 5)
    p1 = _pixels(viz.plot_selection_frequency(f1, grid=(2, 2)))
    p2 = _pixels(viz.plot_selection_frequency(f2, grid=(2, 2)))
    assert not np.array_equal(p1, p2)
    viz.plot_selection_frequency(f1, grid=(2, 2), image=np.zeros((20, 20, 3), np.float32))


def test_plot_token_schedule_follows_scheduler():
    a = _pixels(viz.plot_token_schedule(asel.AdaptiveTokenScheduler(total_steps=100), {"image": 192, "text": 75}))
    b = _pixels(
        viz.plot_token_schedule(asel.AdaptiveTokenScheduler(total_steps=100, rho_end=0.3), {"image": 192, "text": 75})
    )
    assert not np.array_equal(a, b)


def test_plot_inspection_one_figure_for_person_crop_with_registers(tmp_path):
    torch.manual_seed(0)
    n = 5 + 24 * 8  # CLS + 4 registers + 24x8 patches
    maps = {i: torch.softmax(torch.randn(1, n, n), -1) for i in range(3)}
    per_layer = {i: viz.query_row_saliency(m, 0) for i, m in maps.items()}
    sal = asel.MultiLayerRollout(layers=(1, 2))(maps, query=0)
    valid = torch.ones(1, n, dtype=torch.bool)
    valid[:, :5] = False
    idx, mask = F.select_topk(sal, 76, valid=valid)
    fig = viz.plot_inspection(
        torch.rand(3, 384, 128),
        per_layer,
        sal,
        idx,
        grid=(24, 8),
        num_prefix_tokens=5,
        mask=mask,
        rollout_layers=(1, 2),
        suptitle="t",
        save=tmp_path / "insp.png",
    )
    assert len(fig.axes) == 5  # three layers, the rollout, the kept tokens
    assert (tmp_path / "insp.png").stat().st_size > 0
    assert fig.axes[-1].get_title() == "kept 76 of 192 patches"


def test_figures_never_use_pyplot_state():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    viz.plot_saliency(None, torch.rand(10), grid=(3, 3))
    viz.plot_token_schedule(asel.AdaptiveTokenScheduler(total_steps=10), 20)
    assert plt.get_fignums() == before


def test_plot_into_existing_axes():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    assert viz.plot_saliency(None, torch.rand(10), grid=(3, 3), ax=ax1, colorbar=False) is fig
    assert viz.plot_kept_tokens(None, torch.tensor([1, 2]), grid=(3, 3), ax=ax2) is fig
    assert len(fig.axes) == 2


def test_non_square_grid_from_the_image_and_numpy_grids():
    """A person crop (24 x 8 patches) is laid out from the image's aspect ratio when grid is not given; grids given
    as numpy or torch integers work; without an image a non-square count asks for grid=."""
    image = torch.rand(3, 384, 128)
    s = torch.rand(2, 1 + 192)
    inferred = _pixels(viz.plot_saliency(image, s, index=1))
    explicit = _pixels(viz.plot_saliency(image, s, grid=(24, 8), index=1))
    assert np.array_equal(inferred, explicit)
    freq = torch.rand(193)
    assert np.array_equal(
        _pixels(viz.plot_selection_frequency(freq, image=image)),
        _pixels(viz.plot_selection_frequency(freq, grid=(24, 8), image=image)),
    )
    idx = torch.topk(s, 76).indices
    inspected = viz.plot_inspection(image, {4: s, 11: s}, s, idx, index=1)
    assert len(inspected.axes) >= 4
    np_grid = _pixels(viz.plot_kept_tokens(image, idx, grid=tuple(np.array([24, 8])), index=1))
    assert np.array_equal(np_grid, _pixels(viz.plot_kept_tokens(image, idx, grid=(24, 8), index=1)))
    assert viz.patch_grid_scores(s, grid=torch.tensor([24, 8])).shape == (2, 24, 8)
    with pytest.raises(ValueError, match=r"grid=\(rows, cols\)"):
        viz.plot_saliency(None, s)
    with pytest.raises(ValueError, match="grid must be a pair"):
        viz.patch_grid_scores(s, grid=(24.0, 8))


def test_batched_image_follows_index():
    """A [B,3,H,W] batch is drawn at the same index as the batched scores."""
    images = torch.zeros(2, 3, 48, 32)
    images[1] = 1.0
    s = torch.rand(2, 1 + 6)
    idx = torch.tensor([[1, 2, 3], [2, 4, 6]])
    for i in (0, 1):
        a = _pixels(viz.plot_saliency(images, s, grid=(3, 2), index=i))
        assert np.array_equal(a, _pixels(viz.plot_saliency(images[i], s, grid=(3, 2), index=i)))
        b = _pixels(viz.plot_kept_tokens(images, idx, grid=(3, 2), index=i))
        assert np.array_equal(b, _pixels(viz.plot_kept_tokens(images[i], idx, grid=(3, 2), index=i)))
    with pytest.raises(ValueError, match="index 2"):
        viz.plot_kept_tokens(torch.zeros(3, 3, 48, 32), idx, grid=(3, 2), index=2)
