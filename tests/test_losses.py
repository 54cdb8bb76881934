import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from attnselect.losses import CIDLoss, all_gather_with_grad, hardest_negatives, id_loss, sdm_loss, tal_loss


# ------------------------------------------------------------------------------------------------------------------
# references written with explicit loops (float64, Python math)
# ------------------------------------------------------------------------------------------------------------------
def tal_loop(v, t, pids, tau, margin):
    """Per-pair TAL (t2i + i2t) following RDE's formula term by term."""
    v = F.normalize(v.double(), dim=-1)
    t = F.normalize(t.double(), dim=-1)
    b = len(pids)
    s = [[float(t[i] @ v[j]) for j in range(b)] for i in range(b)]
    out = []
    for a in range(b):
        terms = []
        for sim in (lambda i, j: s[i][j], lambda i, j: s[j][i]):  # text anchor a, then image anchor a
            pos = [j for j in range(b) if pids[j] == pids[a]]
            neg = [j for j in range(b) if pids[j] != pids[a]]
            w = [math.exp(sim(a, j) / tau) for j in pos]
            pos_term = sum(wi / sum(w) * sim(a, j) for wi, j in zip(w, pos))
            if not neg:
                terms.append(0.0)
                continue
            total = min(sum(math.exp(sim(a, j) / tau) for j in neg), 1e36)
            terms.append(max(0.0, margin - pos_term + tau * math.log(total)))
        out.append(sum(terms))
    return out


def test_tal_hand_computed():
    # s = t @ v^T = [[1, 0.6], [0.8, 0.96]] with one negative per anchor, so tau*log(exp(s/tau)) = s:
    # t0: 0.5 - 1 + 0.6 = 0.1; t1: 0.5 - 0.96 + 0.8 = 0.34; v0: 0.5 - 1 + 0.8 = 0.3; v1: 0.5 - 0.96 + 0.6 = 0.14
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    pids = torch.tensor([0, 1])
    loss = tal_loss(v, t, pids, tau=0.5, margin=0.5)
    assert loss.item() == pytest.approx(0.88, abs=1e-6)
    per = tal_loss(v, t, pids, tau=0.5, margin=0.5, reduction="none")
    assert per.tolist() == pytest.approx([0.1 + 0.3, 0.34 + 0.14], abs=1e-6)
    assert tal_loss(v, t, pids, tau=0.5, margin=0.5, reduction="mean").item() == pytest.approx(0.44, abs=1e-6)
    # unnormalised inputs give the same loss (features are normalised inside)
    assert tal_loss(3 * v, 0.5 * t, pids, tau=0.5, margin=0.5).item() == pytest.approx(0.88, abs=1e-6)


def test_tal_hand_computed_two_negatives_and_positive_weighting():
    # B = 3, pids [0, 0, 1]; v = t = e0, e0', e1-ish. Anchor text 2 (pid 1): positives {2}, negatives {0, 1}.
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    pids = torch.tensor([0, 0, 1])
    tau, m = 1.0, 1.0
    # s[i][j] = t_i . v_j: [[1, 1, 0], [0.6, 0.6, 0.8], [0, 0, 1]]
    # text 0: pos {0,1} both 1 -> pos term 1; neg {2}: s = 0 -> log(e^0) = 0 -> 1 - 1 + 0 = 0
    # text 1: pos {0,1} both 0.6 -> 0.6; neg {2}: 0.8 -> 1 - 0.6 + 0.8 = 1.2
    # text 2: pos {2}: 1; neg {0,1}: log(2 e^0) = log 2 -> 1 - 1 + log 2
    # image 0: pos texts {0,1} with s 1, 0.6 -> weights e^1, e^0.6; neg text 2: s = 0 -> 1 - p0 + 0
    e1, e6 = math.exp(1.0), math.exp(0.6)
    p0 = (e1 * 1.0 + e6 * 0.6) / (e1 + e6)
    # image 1: same column values as image 0 -> same term; image 2: pos text 2 (s 1), neg texts 0, 1 (s 0, 0.8)
    img2 = 1 - 1 + math.log(math.exp(0.0) + math.exp(0.8))
    expected = 0 + 1.2 + math.log(2) + 2 * (1 - p0) + img2
    assert tal_loss(v, t, pids, tau=tau, margin=m).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("tau", [0.015, 0.05, 0.005])
def test_tal_matches_loop_reference_and_gradients(tau):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(7, 16, generator=g, dtype=torch.float64)
    t = v + 0.7 * torch.randn(7, 16, generator=g, dtype=torch.float64)
    pids = torch.tensor([3, 1, 3, 2, 1, 5, 3])
    ref = tal_loop(v, t, pids.tolist(), tau, 0.1)
    got = tal_loss(v.float(), t.float(), pids, tau=tau, reduction="none")
    assert got.tolist() == pytest.approx(ref, rel=1e-4, abs=1e-4)

    # gradient against an explicit float64 torch loop (positive weights detached, as published)
    vv = v.clone().requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    vn, tn = F.normalize(vv, dim=-1), F.normalize(tt, dim=-1)
    s = tn @ vn.t()
    total = 0.0
    for sim in (s, s.t()):
        for a in range(7):
            pos = pids == pids[a]
            w = torch.softmax((sim[a] / tau).masked_fill(~pos, float("-inf")), 0).detach()
            neg = torch.logsumexp((sim[a] / tau)[~pos], 0).clamp(max=math.log(1e36))
            total = total + (0.1 - (w * sim[a]).sum() + tau * neg).clamp(min=0)
    total.backward()
    vf = v.float().requires_grad_(True)
    tf = t.float().requires_grad_(True)
    tal_loss(vf, tf, pids, tau=tau).backward()
    torch.testing.assert_close(vf.grad.double(), vv.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(tf.grad.double(), tt.grad, rtol=1e-3, atol=1e-4)


def test_tal_clamp_of_negative_sum():
    # tau = 0.01 and a negative as similar as the positive: exp(1 / 0.01) = e^100 > 1e36, so the log is clamped:
    # text 0: 0.3 - 1 + 0.01 * log(1e36) = 0.3 - 1 + 0.828931 = 0.128931 (unclamped it would be 0.3)
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    pids = torch.tensor([0, 1])
    got = tal_loss(v, t, pids, tau=0.01, margin=0.3, reduction="none")
    clamped = 0.3 - 1 + 0.01 * math.log(1e36)
    assert got.tolist() == pytest.approx([2 * clamped, 2 * clamped], abs=1e-5)
    assert got.tolist() == pytest.approx(tal_loop(v, t, [0, 1], 0.01, 0.3), abs=1e-5)


def test_tal_rows_without_negatives_give_zero_not_nan():
    v = torch.randn(4, 8, requires_grad=True)
    t = torch.randn(4, 8, requires_grad=True)
    loss = tal_loss(v, t, torch.tensor([2, 2, 2, 2]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(t.grad).all()
    # mixed: rows of identity 0 have negatives, the lone identity-1 row too; compare with the loop
    pids = torch.tensor([0, 0, 0, 1])
    got = tal_loss(v.detach(), t.detach(), pids, reduction="none")
    assert got.tolist() == pytest.approx(tal_loop(v.detach(), t.detach(), pids.tolist(), 0.015, 0.1), abs=1e-4)
    # a single pair (B = 1) has no negatives
    assert tal_loss(v[:1], t[:1], pids[:1]).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_finite_and_fp32_for_half_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    v32 = torch.randn(8, 32, generator=g)
    t32 = v32 + 0.1 * torch.randn(8, 32, generator=g)
    pids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    v, t = v32.to(dtype).requires_grad_(True), t32.to(dtype).requires_grad_(True)
    loss = tal_loss(v, t, pids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = tal_loss(v32.to(dtype).float(), t32.to(dtype).float(), pids)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert v.grad.dtype == dtype and torch.isfinite(v.grad.float()).all()
    s = sdm_loss(v, t, pids)
    assert s.dtype == torch.float32 and torch.isfinite(s)
    cid = CIDLoss(32, 4)
    out = cid(v, t, pids)
    assert torch.isfinite(out.total) and out.pair_loss.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out2 = cid(v32, t32, pids)
    assert out2.pair_loss.dtype == torch.float32


def test_input_validation():
    v, t = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="same batch size"):
        tal_loss(v, t[:3], torch.arange(4))
    with pytest.raises(ValueError, match=r"pids must be a 1-D tensor of shape \[B\]"):
        tal_loss(v, t, torch.arange(3))
    with pytest.raises(ValueError, match="1-D"):
        tal_loss(v, t, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        tal_loss(v, t, torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        sdm_loss(v[None], t, torch.arange(4))
    with pytest.raises(ValueError, match="share D"):
        tal_loss(v, torch.randn(4, 7), torch.arange(4))
    with pytest.raises(ValueError, match="reduction"):
        tal_loss(v, t, torch.arange(4), reduction="avg")
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        CIDLoss(8, 5)(v, t, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="D = 8"):
        CIDLoss(8, 5)(torch.randn(4, 6), torch.randn(4, 6), torch.arange(4))
    with pytest.raises(ValueError, match="negative_label"):
        CIDLoss(8, 5, negative_label="max")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        id_loss(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))


# ------------------------------------------------------------------------------------------------------------------
# CID
# ------------------------------------------------------------------------------------------------------------------
def brute_force_negatives(v, t, pids):
    """Python search: for image i the most similar text of another identity (first on ties), and vice versa."""
    s = F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).t()
    b = len(pids)
    text_neg, image_neg = [], []
    for i in range(b):
        best, arg = -float("inf"), -1
        for j in range(b):
            if pids[j] != pids[i] and s[i, j].item() > best:
                best, arg = s[i, j].item(), j
        text_neg.append(arg)
        best, arg = -float("inf"), -1
        for k in range(b):
            if pids[k] != pids[i] and s[k, i].item() > best:
                best, arg = s[k, i].item(), k
        image_neg.append(arg)
    return text_neg, image_neg


def test_cid_hardest_negatives_match_brute_force():
    g = torch.Generator().manual_seed(3)
    for trial in range(5):
        b = 9 + trial
        v, t = torch.randn(b, 12, generator=g), torch.randn(b, 12, generator=g)
        pids = torch.randint(0, 4, (b,), generator=g)
        out = CIDLoss(12, 4)(v, t, pids)
        text_neg, image_neg = brute_force_negatives(v, t, pids.tolist())
        assert out.text_negatives.tolist() == text_neg
        assert out.image_negatives.tolist() == image_neg


def test_hardest_negatives_ties_and_no_negative():
    sim = torch.tensor([[0.5, 0.9, 0.9, 0.1], [0.2, 0.2, 0.2, 0.2]])
    idx, ok = hardest_negatives(sim, torch.tensor([0, 1]), torch.tensor([0, 1, 1, 1]))
    assert idx[0].item() == 1 and ok.tolist() == [True, True]  # tie 0.9 / 0.9 -> lower index
    assert idx[1].item() == 0
    idx, ok = hardest_negatives(sim[:, :1], torch.tensor([0, 0]), torch.tensor([0]))
    assert ok.tolist() == [False, False]


def manual_cid(module, v, t, pids, neg_label):
    """Pair loss and id loss from loop-built pairs, using the module's own layers."""
    text_neg, image_neg = brute_force_negatives(v, t, pids.tolist())
    pairs = []
    for i in range(len(pids)):
        pairs.append((v[i], t[i], int(pids[i])))
        if image_neg[i] >= 0:
            pairs.append((v[image_neg[i]], t[i], neg_label))
        if text_neg[i] >= 0:
            pairs.append((v[i], t[text_neg[i]], neg_label))
    pv = torch.stack([p[0] for p in pairs])
    pt = torch.stack([p[1] for p in pairs])
    labels = torch.tensor([p[2] for p in pairs])
    l1 = F.cross_entropy(module.pair_classifier(module.pair_head(torch.cat([pv, pt], 1))), labels)
    l2 = F.cross_entropy(module.pair_classifier(module.pair_head(torch.cat([pt, pv], 1))), labels)
    ident = F.cross_entropy(module.id_classifier(v), pids) + F.cross_entropy(module.id_classifier(t), pids)
    return 0.5 * (l1 + l2), ident


@pytest.mark.parametrize("mode", ["extra", "batch_max"])
def test_cid_loss_matches_manual_pairs(mode):
    torch.manual_seed(0)
    module = CIDLoss(6, 10, negative_label=mode)
    # make the classifier sensitive to labels so that a wrong label changes the loss visibly
    with torch.no_grad():
        module.pair_classifier.weight.normal_(0, 1.0)
    v, t = torch.randn(6, 6), torch.randn(6, 6)
    pids = torch.tensor([0, 1, 1, 2, 4, 4])
    out = module(v, t, pids)
    neg = 10 if mode == "extra" else 5  # the extra class C vs the published max(pid in batch) + 1
    pair, ident = manual_cid(module, v, t, pids, neg)
    torch.testing.assert_close(out.pair_loss, pair)
    torch.testing.assert_close(out.id_loss, ident)
    other = manual_cid(module, v, t, pids, 5 if mode == "extra" else 10)[0]
    assert abs(out.pair_loss.item() - other.item()) > 1e-3
    assert torch.allclose(out.total, pair + ident)


def test_cid_init_shapes_and_missing_negatives():
    module = CIDLoss(16, 7)
    assert module.pair_head[0].in_features == 32 and module.pair_head[0].out_features == 16
    assert isinstance(module.pair_head[1], torch.nn.LayerNorm) and isinstance(module.pair_head[2], torch.nn.GELU)
    for layer in (module.pair_classifier, module.id_classifier):
        assert layer.out_features == 8
        assert layer.weight.std().item() == pytest.approx(0.001, rel=0.1)
        assert torch.all(layer.bias == 0)
    assert "negative_label='extra'" in repr(module)
    v, t = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16)
    out = module(v, t, torch.tensor([2, 2, 2]))  # no negatives at all: only the positive pairs
    assert out.image_negatives.tolist() == [-1, -1, -1]
    assert torch.isfinite(out.total)
    out.total.backward()
    assert torch.isfinite(v.grad).all()
    no_id = CIDLoss(16, 7, use_id=False)
    assert no_id.id_classifier is None and no_id(v, t, torch.tensor([0, 1, 2])).id_loss.item() == 0.0


# ------------------------------------------------------------------------------------------------------------------
# ID and SDM
# ------------------------------------------------------------------------------------------------------------------
def test_id_loss():
    li, lt = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    expected = F.cross_entropy(li, y) + F.cross_entropy(lt, y)
    torch.testing.assert_close(id_loss(li, lt, y), expected)
    torch.testing.assert_close(id_loss(li, lt, y, combine="mean"), expected / 2)
    torch.testing.assert_close(id_loss(li.half(), lt.half(), y), id_loss(li.half().float(), lt.half().float(), y))


def sdm_loop(v, t, pids, scale, eps=1e-8, image_ids=None, factor=0.3):
    v = F.normalize(v.double(), dim=-1)
    t = F.normalize(t.double(), dim=-1)
    b = len(pids)
    s = [[float(t[i] @ v[j]) for j in range(b)] for i in range(b)]
    lab = [[1.0 if pids[i] == pids[j] else 0.0 for j in range(b)] for i in range(b)]
    if image_ids is not None:
        for i in range(b):
            for j in range(b):
                same = 1.0 if image_ids[i] == image_ids[j] else 0.0
                lab[i][j] = (lab[i][j] - same) * factor + same
    total = 0.0
    for mat in ([[s[j][i] for j in range(b)] for i in range(b)], s):  # i2t rows, t2i rows
        acc = 0.0
        for i in range(b):
            z = [scale * x for x in mat[i]]
            mx = max(z)
            lse = mx + math.log(sum(math.exp(x - mx) for x in z))
            q_sum = sum(lab[i])
            for j in range(b):
                logp = z[j] - lse
                acc += math.exp(logp) * (logp - math.log(lab[i][j] / q_sum + eps))
        total += acc / b
    return total


def test_sdm_matches_loop():
    g = torch.Generator().manual_seed(4)
    v, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    pids = [0, 1, 0, 2, 1, 0]
    got = sdm_loss(v, t, torch.tensor(pids), 50.0)
    assert got.item() == pytest.approx(sdm_loop(v, t, pids, 50.0), rel=1e-4)
    got = sdm_loss(v, t, torch.tensor(pids), 10.0, image_ids=torch.tensor([0, 1, 0, 2, 3, 4]))
    assert got.item() == pytest.approx(sdm_loop(v, t, pids, 10.0, image_ids=[0, 1, 0, 2, 3, 4]), rel=1e-4)
    scale = torch.tensor(20.0, requires_grad=True)
    sdm_loss(v, t, torch.tensor(pids), scale).backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


# ------------------------------------------------------------------------------------------------------------------
# gather
# ------------------------------------------------------------------------------------------------------------------
def test_gather_is_noop_without_distributed():
    assert not torch.distributed.is_initialized()
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
    v, t = torch.randn(6, 8), torch.randn(6, 8)
    pids = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(tal_loss(v, t, pids, gather=True), tal_loss(v, t, pids))
    torch.testing.assert_close(sdm_loss(v, t, pids, gather=True), sdm_loss(v, t, pids))
    li, lt = torch.randn(6, 3), torch.randn(6, 3)
    torch.testing.assert_close(id_loss(li, lt, pids, gather=True), id_loss(li, lt, pids))
    torch.manual_seed(0)
    a = CIDLoss(8, 3, gather=True)(v, t, pids)
    torch.manual_seed(0)
    b = CIDLoss(8, 3)(v, t, pids)
    torch.testing.assert_close(a.total, b.total)


def _worker(rank, world, port, result_path):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        v = torch.randn(7, 8, generator=g)
        t = torch.randn(7, 8, generator=g)
        pids = torch.tensor([0, 1, 2, 0, 1, 3, 3])
        # uneven shards: rank 0 holds 4 rows, rank 1 holds 3
        sl = slice(0, 4) if rank == 0 else slice(4, 7)
        vl, tl = v[sl].clone().requires_grad_(True), t[sl].clone().requires_grad_(True)
        loss = tal_loss(vl, tl, pids[sl], gather=True)
        loss.backward()
        torch.save({"loss": loss.detach(), "gv": vl.grad, "gt": tl.grad}, f"{result_path}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_gather_gradients_two_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.fspath(tmp_path / "res")
    torch.multiprocessing.spawn(_worker, args=(2, port, path), nprocs=2, join=True)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(7, 8, generator=g).requires_grad_(True)
    t = torch.randn(7, 8, generator=g).requires_grad_(True)
    full = tal_loss(v, t, torch.tensor([0, 1, 2, 0, 1, 3, 3]))
    full.backward()
    r0, r1 = torch.load(f"{path}.0"), torch.load(f"{path}.1")
    torch.testing.assert_close(r0["loss"], full.detach())
    torch.testing.assert_close(r1["loss"], full.detach())
    # each rank's local gradient is the sum over both ranks' (identical) losses: 2 x the full-batch gradient;
    # DDP's averaging over 2 ranks then gives exactly the full-batch gradient
    torch.testing.assert_close(torch.cat([r0["gv"], r1["gv"]]), 2 * v.grad)
    torch.testing.assert_close(torch.cat([r0["gt"], r1["gt"]]), 2 * t.grad)


def test_id_loss_accepts_int32_labels():
    # int32 labels pass the integer check; cross_entropy itself only takes int64 targets
    li, lt = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 4, 1, 1])
    torch.testing.assert_close(id_loss(li, lt, y.int()), id_loss(li, lt, y))


def test_tal_positive_weights_carry_no_gradient():
    """With tau = 1 the positive weights vary smoothly, so a gradient through them would change the result."""
    g = torch.Generator().manual_seed(3)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.randn(6, 5, generator=g, dtype=torch.float64)
    pids = torch.tensor([0, 0, 0, 1, 1, 2])
    tau, margin = 1.0, 3.0  # every hinge active

    def reference(detach: bool):
        vv, tt = v.clone().requires_grad_(True), t.clone().requires_grad_(True)
        s = F.normalize(tt, dim=-1) @ F.normalize(vv, dim=-1).t()
        total = 0.0
        for sim in (s, s.t()):
            for a in range(6):
                pos = pids == pids[a]
                w = torch.softmax((sim[a] / tau).masked_fill(~pos, float("-inf")), 0)
                w = w.detach() if detach else w
                total = total + margin - (w * sim[a]).sum() + tau * torch.logsumexp(sim[a][~pos] / tau, 0)
        total.backward()
        return vv.grad, tt.grad

    gv, gt = reference(detach=True)
    gv_attached, _ = reference(detach=False)
    assert (gv - gv_attached).abs().max() > 1e-3  # the two conventions are distinguishable here
    vf, tf = v.float().requires_grad_(True), t.float().requires_grad_(True)
    tal_loss(vf, tf, pids, tau=tau, margin=margin).backward()
    torch.testing.assert_close(vf.grad.double(), gv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tf.grad.double(), gt, rtol=1e-4, atol=1e-5)


def test_loss_defaults_are_the_published_values():
    """TAL: tau 0.015, margin 0.1; SDM: logit_scale 50, factor 0.3 (IRRA)."""
    g = torch.Generator().manual_seed(4)
    v, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    pids, image_ids = torch.tensor([0, 0, 1, 1, 2, 3]), torch.tensor([0, 1, 2, 2, 3, 4])
    assert tal_loss(v, t, pids).item() == tal_loss(v, t, pids, tau=0.015, margin=0.1).item()
    assert tal_loss(v, t, pids).item() != tal_loss(v, t, pids, tau=0.02, margin=0.1).item()
    assert sdm_loss(v, t, pids).item() == sdm_loss(v, t, pids, logit_scale=50.0).item()
    assert sdm_loss(v, t, pids).item() != sdm_loss(v, t, pids, logit_scale=1 / 0.07).item()
    with_ids = sdm_loss(v, t, pids, image_ids=image_ids).item()
    assert with_ids == sdm_loss(v, t, pids, 50.0, image_ids=image_ids, factor=0.3).item()
    assert with_ids != sdm_loss(v, t, pids, 50.0, image_ids=image_ids, factor=0.5).item()
