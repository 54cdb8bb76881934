import numpy as np
import pytest
import torch

from attnselect.metrics import retrieval_metrics, rsum


def loop_reference(sim, qids, gids, ks=(1, 5, 10)):
    """IRRA's definitions, one query at a time, with a stable descending sort (ties: lower gallery index first)."""
    sim, qids, gids = np.asarray(sim, dtype=np.float64), np.asarray(qids), np.asarray(gids)
    hits = {k: 0 for k in ks}
    aps, inps = [], []
    for q in range(sim.shape[0]):
        order = np.argsort(-sim[q], kind="stable")
        m = gids[order] == qids[q]
        for k in ks:
            hits[k] += bool(m[:k].any())
        pos_ranks = np.nonzero(m)[0] + 1
        aps.append(np.mean([(i + 1) / r for i, r in enumerate(pos_ranks)]))
        inps.append(len(pos_ranks) / pos_ranks[-1])
    n = sim.shape[0]
    out = {f"R{k}": 100 * hits[k] / n for k in ks}
    out["mAP"] = 100 * float(np.mean(aps))
    out["mINP"] = 100 * float(np.mean(inps))
    return out


def test_hand_computed_two_queries():
    # query 0 (id 0): ranking g3 (id 2), g0 (0), g1 (1), g2 (0) -> matches 0 1 0 1:
    #   R@1 miss, R@5 hit; AP = (1/2 + 2/4) / 2 = 0.5; INP = 2 / 4 = 0.5
    # query 1 (id 1): ranking g1 (1), g2, g0, g3 -> matches 1 0 0 0: R@1 hit, AP = 1, INP = 1
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.95], [0.2, 0.7, 0.3, 0.1]])
    out = retrieval_metrics(sim, torch.tensor([0, 1]), torch.tensor([0, 1, 0, 2]))
    assert out["R1"] == pytest.approx(50.0)
    assert out["R5"] == pytest.approx(100.0)
    assert out["R10"] == pytest.approx(100.0)
    assert out["mAP"] == pytest.approx(75.0)
    assert out["mINP"] == pytest.approx(75.0)
    assert out["rsum"] == pytest.approx(250.0)
    assert rsum(out) == pytest.approx(250.0)
    assert out["num_queries"] == 2 and out["num_skipped"] == 0


def test_several_positives_hand_computed():
    # one query (id 7), gallery ids [7, 1, 7, 7, 2, 1], scores give the ranking g4, g0, g1, g2, g5, g3
    # matches: 0 1 0 1 0 1 -> AP = (1/2 + 2/4 + 3/6) / 3 = 0.5, INP = 3 / 6 = 0.5, R@1 = 0, R@2 = 100
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.95, 0.2]])
    out = retrieval_metrics(sim, torch.tensor([7]), torch.tensor([7, 1, 7, 7, 2, 1]), ks=(1, 2, 3))
    assert out["R1"] == 0.0 and out["R2"] == 100.0 and out["R3"] == 100.0
    assert out["mAP"] == pytest.approx(50.0)
    assert out["mINP"] == pytest.approx(50.0)
    assert out["rsum"] == pytest.approx(200.0)
    # positives at ranks 1, 2, 4: AP = (1 + 1 + 3/4) / 3, INP = 3/4
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.65, 0.1, 0.0]])
    out = retrieval_metrics(sim, torch.tensor([7]), torch.tensor([7, 7, 1, 7, 2, 1]))
    assert out["mAP"] == pytest.approx(100 * (1 + 1 + 0.75) / 3)
    assert out["mINP"] == pytest.approx(75.0)


def test_ties_go_to_lower_gallery_index():
    # all scores equal: the ranking is the gallery order 0, 1, 2, 3
    sim = torch.full((2, 4), 0.5)
    out = retrieval_metrics(sim, torch.tensor([0, 2]), torch.tensor([1, 0, 0, 2]))
    # query 0 (id 0): matches 0 1 1 0 -> AP = (1/2 + 2/3) / 2, INP = 2/3, R@1 miss
    # query 1 (id 2): matches 0 0 0 1 -> AP = 1/4, INP = 1/4, R@1 miss
    assert out["R1"] == 0.0 and out["R5"] == 100.0
    assert out["mAP"] == pytest.approx(100 * ((0.5 + 2 / 3) / 2 + 0.25) / 2)
    assert out["mINP"] == pytest.approx(100 * (2 / 3 + 0.25) / 2)
    # a tie between a positive at index 0 and a negative at index 1 ranks the positive first ...
    out = retrieval_metrics(torch.tensor([[0.3, 0.3, 0.1]]), torch.tensor([5]), torch.tensor([5, 4, 4]))
    assert out["R1"] == 100.0
    # ... and a negative at the lower index first
    out = retrieval_metrics(torch.tensor([[0.3, 0.3, 0.1]]), torch.tensor([5]), torch.tensor([4, 5, 4]))
    assert out["R1"] == 0.0 and out["mAP"] == pytest.approx(50.0)


@pytest.mark.parametrize("chunk", [1, 4, 37, 1000, None])
def test_chunked_equals_reference(chunk):
    rng = np.random.default_rng(0)
    q, g = 37, 23
    sim = np.round(rng.normal(size=(q, g)), 1)  # coarse values: many ties
    gids = rng.integers(0, 6, size=g)
    qids = gids[rng.integers(0, g, size=q)]  # every query has a positive
    ref = loop_reference(sim, qids, gids)
    out = retrieval_metrics(
        torch.tensor(sim, dtype=torch.float32), torch.tensor(qids), torch.tensor(gids), chunk_size=chunk
    )
    for key, value in ref.items():
        assert out[key] == pytest.approx(value, abs=1e-9), key
    full = retrieval_metrics(
        torch.tensor(sim, dtype=torch.float32), torch.tensor(qids), torch.tensor(gids), chunk_size=q
    )
    assert out.keys() == full.keys()
    assert all(out[k] == pytest.approx(full[k], rel=1e-12) for k in out)


def test_inputs_numpy_half_and_large_k():
    sim = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    out = retrieval_metrics(sim, [0, 0], [0, 1], ks=(1, 50))
    assert out["R1"] == 50.0 and out["R50"] == 100.0
    half = retrieval_metrics(torch.tensor(sim).half(), torch.tensor([0, 0]), torch.tensor([0, 1]), ks=(1, 50))
    assert half == out


def test_queries_without_positive():
    sim = torch.tensor([[0.9, 0.1], [0.5, 0.6], [0.2, 0.3]])
    qids, gids = torch.tensor([0, 3, 1]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"1 queries have no positive.*\[1\]"):
        retrieval_metrics(sim, qids, gids)
    out = retrieval_metrics(sim, qids, gids, missing="skip")
    assert out["num_queries"] == 2 and out["num_skipped"] == 1
    ref = retrieval_metrics(sim[[0, 2]], qids[[0, 2]], gids)
    assert out["R1"] == ref["R1"] == 100.0 and out["mAP"] == ref["mAP"]
    with pytest.raises(ValueError, match="no query has a positive"):
        retrieval_metrics(sim, torch.tensor([5, 6, 7]), gids, missing="skip")


def test_validation():
    sim = torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"\[Q, G\]"):
        retrieval_metrics(sim[0], torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"query_ids must have shape \[3\]"):
        retrieval_metrics(sim, torch.zeros(2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        retrieval_metrics(sim, torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(sim, torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), ks=(0,))
    with pytest.raises(ValueError, match="missing"):
        retrieval_metrics(sim, torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), missing="x")


def test_nan_scores_and_duplicate_ks_raise():
    # a NaN would be sorted first and silently counted as a rank (an all-NaN matrix gave R@5 = 100)
    sim = torch.rand(3, 12)
    sim[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"similarity holds 1 NaN"):
        retrieval_metrics(sim, torch.tensor([0, 1, 2]), torch.arange(12))
    with pytest.raises(ValueError, match="distinct"):
        retrieval_metrics(torch.rand(3, 12), torch.tensor([0, 1, 2]), torch.arange(12), ks=(1, 5, 5))
    # -inf is a legitimate score (a masked pair): ranked last
    sim = torch.tensor([[float("-inf"), 0.2, 0.1]])
    out = retrieval_metrics(sim, torch.tensor([0]), torch.tensor([0, 1, 2]), ks=(1, 3))
    assert out["R1"] == 0.0 and out["R3"] == 100.0 and out["mAP"] == pytest.approx(100 / 3)
