import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnselect.data import (
    EOS_ID,
    MASK_ID,
    SOS_ID,
    ImageDataset,
    PedesTrainDataset,
    RandomIdentitySampler,
    TextDataset,
    augment_tokens,
    build_test_transform,
    build_train_transform,
    generate_synthetic_pedes,
    get_tokenizer,
    load_pedes,
    read_cuhk_pedes,
    read_icfg_pedes,
    read_rstpreid,
    synthetic_pedes_root,
    tokenize,
)
from attnselect.data.transforms import CLIP_MEAN, CLIP_STD

FIXTURES = Path(__file__).parent / "fixtures" / "pedes"
LAYOUT = {
    "CUHK-PEDES": ("reid_raw.json", "file_path"),
    "ICFG-PEDES": ("ICFG-PEDES.json", "file_path"),
    "RSTPReid": ("data_captions.json", "img_path"),
}


def _png(path: Path, colour=(120, 30, 200), size=(8, 16)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def pedes_root(tmp_path):
    """The three fixture layouts copied to tmp_path, with a tiny PNG for every record."""
    root = tmp_path / "data"
    shutil.copytree(FIXTURES, root)
    for name, (anno, key) in LAYOUT.items():
        for rec in json.loads((root / name / anno).read_text()):
            _png(root / name / "imgs" / rec[key])
    return root


def _write(root: Path, name: str, records) -> None:
    anno = LAYOUT[name][0]
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / anno).write_text(json.dumps(records))


# ------------------------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------------------------
def test_read_cuhk_pedes(pedes_root):
    d = read_cuhk_pedes(pedes_root, check_files=True)
    assert d.name == "CUHK-PEDES" and d.num_classes == 2
    assert [s.pid for s in d.train] == [0, 0, 0, 0, 1, 1]  # ids 1, 1, 2 shifted to 0-based
    assert [s.image_id for s in d.train] == [0, 0, 1, 1, 2, 2]
    assert d.train[2].caption == "The man wears a red shirt."
    assert d.train[0].img_path == os.path.join(pedes_root, "CUHK-PEDES", "imgs", "cam_a", "0001_a.png")
    assert d.val["image_pids"] == [3] and d.val["caption_pids"] == [3, 3]
    assert d.test["image_pids"] == [4, 4, 5]  # val/test ids kept as stored
    assert d.test["caption_pids"] == [4, 4, 4, 4, 5, 5]
    assert d.test["captions"][4] == "An old man with a cane."
    assert len(d.test["img_paths"]) == 3 and all(os.path.isfile(p) for p in d.test["img_paths"])
    assert "train: 2 ids, 3 images, 6 captions" in d.summary()
    # the dataset folder itself is accepted as root, and the name dispatcher finds it
    assert load_pedes("cuhk-pedes", pedes_root / "CUHK-PEDES").train == d.train


def test_read_icfg_and_rstpreid(pedes_root):
    icfg = read_icfg_pedes(pedes_root, check_files=True)
    assert [s.pid for s in icfg.train] == [0, 0, 1] and icfg.num_classes == 2
    assert [s.image_id for s in icfg.train] == [0, 1, 2]
    assert icfg.test["image_pids"] == [3102, 3103] and icfg.val["img_paths"] == []
    rstp = read_rstpreid(pedes_root, check_files=True)
    assert [s.pid for s in rstp.train] == [0, 0, 1, 1, 1, 1] and rstp.num_classes == 2
    assert rstp.train[0].img_path.endswith(os.path.join("RSTPReid", "imgs", "0000_c14_0031.jpg"))
    assert rstp.val["image_pids"] == [3701] and rstp.test["caption_pids"] == [3901, 3901]
    assert load_pedes("RSTPReid", pedes_root).test == rstp.test
    with pytest.raises(ValueError, match="unknown dataset"):
        load_pedes("market1501", pedes_root)


def test_icfg_underscore_annotation_name_is_accepted(pedes_root):
    """The dataset's README names the file ICFG_PEDES.json; the published loader expects ICFG-PEDES.json."""
    folder = pedes_root / "ICFG-PEDES"
    expected = read_icfg_pedes(pedes_root)
    (folder / "ICFG-PEDES.json").rename(folder / "ICFG_PEDES.json")
    got = read_icfg_pedes(pedes_root)
    assert got.train == expected.train and got.test == expected.test and got.num_classes == expected.num_classes


def test_missing_annotation_and_image(pedes_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reid_raw\.json"):
        read_cuhk_pedes(tmp_path / "nowhere")
    os.remove(pedes_root / "CUHK-PEDES" / "imgs" / "CUHK01" / "0002.png")
    read_cuhk_pedes(pedes_root)  # not checked by default
    with pytest.raises(FileNotFoundError, match="record 2"):
        read_cuhk_pedes(pedes_root, check_files=True)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../../outside.png", "escapes"),
        ("cam_a/../../x.png", "escapes"),
        ("/etc/passwd", "absolute"),
        ("", "non-empty"),
    ],
)
def test_path_escaping_root_raises(tmp_path, path, message):
    good = {"split": "train", "captions": ["a"], "file_path": "a.png", "id": 1}
    _write(tmp_path, "CUHK-PEDES", [good, {**good, "file_path": path}])
    with pytest.raises(ValueError, match=f"record 1.*{message}"):
        read_cuhk_pedes(tmp_path)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"split": "train", "file_path": "a.png", "id": 1}, "missing key"),
        ({"split": "train", "captions": 5, "file_path": "a.png", "id": 1}, "captions"),
        ({"split": "train", "captions": [], "file_path": "a.png", "id": 1}, "captions"),
        ({"split": "train", "captions": ["ok", 7], "file_path": "a.png", "id": 1}, "caption"),
        ({"split": "train", "captions": ["a"], "file_path": "a.png", "id": "abc"}, "'id' must be an integer"),
        ({"split": "train", "captions": ["a"], "file_path": "a.png", "id": 1.5}, "'id' must be an integer"),
        ({"split": 3, "captions": ["a"], "file_path": "a.png", "id": 1}, "'split'"),
        (["not", "a", "dict"], "JSON object"),
        ({"split": "train", "captions": ["a"], "file_path": "a.png", "id": 0}, "negative"),
    ],
)
def test_malformed_records_name_their_index(tmp_path, bad, message):
    good = {"split": "train", "captions": ["a"], "file_path": "a.png", "id": 1}
    _write(tmp_path, "CUHK-PEDES", [good, good, bad])
    with pytest.raises(ValueError, match=f"record 2.*{message}"):
        read_cuhk_pedes(tmp_path)


def test_blank_captions_are_left_out_with_a_warning(tmp_path, caplog):
    recs = [
        {"split": "train", "captions": ["a man", " "], "file_path": "a.png", "id": 1},
        {"split": "train", "captions": [""], "file_path": "b.png", "id": 2},
        {"split": "train", "captions": ["a woman"], "file_path": "c.png", "id": 2},
        {"split": "test", "captions": ["", "a dog"], "file_path": "d.png", "id": 9},
        {"split": "test", "captions": ["\t"], "file_path": "e.png", "id": 8},
    ]
    _write(tmp_path, "CUHK-PEDES", recs)
    with caplog.at_level("WARNING", logger="attnselect.data.pedes"):
        data = read_cuhk_pedes(tmp_path)
    assert [(s.pid, s.image_id, s.caption) for s in data.train] == [(0, 0, "a man"), (1, 1, "a woman")]
    assert data.num_classes == 2
    assert data.test["captions"] == ["a dog"] and data.test["caption_pids"] == [9]
    assert data.test["image_pids"] == [9, 8]  # an image without a caption stays in the gallery
    assert "4 record(s)" in caplog.text and "[0, 1, 3, 4]" in caplog.text


def test_file_level_errors(tmp_path):
    _write(tmp_path, "RSTPReid", {"not": "a list"})
    with pytest.raises(ValueError, match="JSON list"):
        read_rstpreid(tmp_path)
    (tmp_path / "RSTPReid" / "data_captions.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_rstpreid(tmp_path)
    rec = {"split": "train", "captions": ["a"], "img_path": "a.png"}
    _write(tmp_path, "RSTPReid", [{**rec, "id": 0}, {**rec, "id": 2}])  # identity 1 missing
    with pytest.raises(ValueError, match=r"exactly 0\.\.C-1"):
        read_rstpreid(tmp_path)
    _write(tmp_path, "ICFG-PEDES", [{**rec, "id": 0}])  # ICFG uses file_path, not img_path
    with pytest.raises(ValueError, match=r"record 0.*file_path"):
        read_icfg_pedes(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# tokenisation and text augmentation
# ------------------------------------------------------------------------------------------------------------------
def test_tokenize_short_and_batch():
    tok = get_tokenizer()
    ids = tokenize("A man in a red shirt.")
    words = tok.encode("A man in a red shirt.")
    assert ids.shape == (77,) and ids.dtype == torch.long
    assert ids[0] == SOS_ID and ids[1 : 1 + len(words)].tolist() == words and ids[1 + len(words)] == EOS_ID
    assert torch.all(ids[2 + len(words) :] == 0)
    assert int(ids.argmax()) == 1 + len(words)  # EOS is the largest id
    batch = tokenize(["a", "b c"], text_length=10)
    assert batch.shape == (2, 10)


def test_tokenize_truncation_keeps_eos():
    caption = " ".join(["pedestrian wearing"] * 60)
    words = get_tokenizer().encode(caption)
    assert len(words) > 75
    ids = tokenize(caption)
    assert ids[0] == SOS_ID and ids[-1] == EOS_ID and int((ids == 0).sum()) == 0
    assert ids[1:76].tolist() == words[:75]
    assert int(ids.argmax()) == 76
    with pytest.raises(ValueError, match="text_length=77"):
        tokenize(caption, truncate=False)
    with pytest.raises(ValueError, match="text_length"):
        tokenize("a", text_length=1)


def _caption_ids(n_words=40, length=77):
    ids = torch.zeros(length, dtype=torch.long)
    ids[0] = SOS_ID
    ids[1 : 1 + n_words] = torch.arange(100, 100 + n_words)
    ids[1 + n_words] = EOS_ID
    return ids


def test_augment_deterministic_and_input_untouched():
    ids = _caption_ids()
    before = ids.clone()
    a = augment_tokens(ids, generator=torch.Generator().manual_seed(5))
    b = augment_tokens(ids, generator=torch.Generator().manual_seed(5))
    c = augment_tokens(ids, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(ids, before)
    assert a[0] == SOS_ID and int((a == EOS_ID).sum()) == 1 and a.shape == ids.shape


def test_augment_never_empty():
    ids = _caption_ids(5)
    g = torch.Generator().manual_seed(0)
    out = augment_tokens(ids, prob=1.0, mask_prob=0.0, replace_prob=0.0, generator=g)  # delete every word
    assert out[:3].tolist() == [SOS_ID, 100, EOS_ID] and torch.all(out[3:] == 0)
    out = augment_tokens(ids, prob=1.0, mask_prob=0.0, replace_prob=0.0, allow_empty=True, generator=g)
    assert out[:2].tolist() == [SOS_ID, EOS_ID] and torch.all(out[2:] == 0)
    for seed in range(200):  # one-word captions never become empty
        out = augment_tokens(_caption_ids(1), generator=torch.Generator().manual_seed(seed))
        assert int(((out > 0) & (out != SOS_ID) & (out != EOS_ID)).sum()) == 1


def test_augment_rates_match_published_scheme():
    g = torch.Generator().manual_seed(1)
    n_words, trials = 75, 400
    ids = _caption_ids(n_words)
    masked = replaced = deleted = 0
    for _ in range(trials):
        out = augment_tokens(ids, generator=g)
        body = out[1 : int((out == EOS_ID).nonzero()[0])]
        deleted += n_words - body.numel()
        masked += int((body == MASK_ID).sum())
        original = (body >= 100) & (body < 100 + n_words)
        replaced += int((~original & (body != MASK_ID)).sum())
        assert torch.all((body >= 1) & (body <= MASK_ID))
    total = n_words * trials
    # perturbed with prob 0.2: mask 0.6, random id 0.2, delete 0.2 -> 0.12, ~0.04 (a random id can hit the
    # original range, negligible), 0.04
    assert masked / total == pytest.approx(0.12, abs=0.01)
    assert replaced / total == pytest.approx(0.04, abs=0.006)
    assert deleted / total == pytest.approx(0.04, abs=0.006)
    special = torch.tensor([SOS_ID, MASK_ID, 5, EOS_ID, 0, 0])
    assert torch.equal(
        augment_tokens(special, prob=1.0, mask_prob=0.0, replace_prob=1.0, generator=g)[[0, 1, 3]],
        torch.tensor([SOS_ID, MASK_ID, EOS_ID]),
    )


# ------------------------------------------------------------------------------------------------------------------
# transforms and datasets
# ------------------------------------------------------------------------------------------------------------------
def test_transforms_values_and_erasing():
    from PIL import Image

    img = Image.new("RGB", (24, 64), (255, 255, 255))
    x = build_test_transform((64, 24))(img)
    assert x.shape == (3, 64, 24)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[:, 10, 10], expected)
    torch.manual_seed(0)
    erased = build_train_transform((64, 24), erasing_prob=1.0)(img)
    assert erased.shape == (3, 64, 24)
    fill = torch.tensor(CLIP_MEAN)[:, None, None]
    assert bool(torch.isclose(erased, fill.expand_as(erased)).all(0).any())  # erased area holds the raw mean
    plain = build_train_transform((64, 24), erasing_prob=0.0)(img)
    assert not bool(torch.isclose(plain, fill.expand_as(plain)).all(0).any())
    # Pad(10) + RandomCrop shows zero padding (normalised to -mean/std) in some crops
    pads = [build_train_transform((64, 24), erasing_prob=0.0)(img) for _ in range(10)]
    zero = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    assert any(bool(torch.isclose(p, zero[:, None, None].expand_as(p)).all(0).any()) for p in pads)
    assert torch.equal(build_train_transform((64, 24), augment=False)(img), x)


def test_import_does_not_pull_open_clip_or_torchvision():
    code = (
        "import sys, attnselect.data, attnselect.losses, attnselect.metrics; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('open_clip', 'torchvision')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ------------------------------------------------------------------------------------------------------------------
# sampler
# ------------------------------------------------------------------------------------------------------------------
PIDS = [0] * 5 + [1] * 1 + [2] * 4 + [3] * 3 + [4] * 2 + [5] * 6 + [6] * 2 + [7] * 1 + [8] * 4 + [9] * 3


def _check_batches(indices, batch_size, num_instances):
    assert len(indices) % batch_size == 0
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        counts = {}
        for i in batch:
            counts[PIDS[i]] = counts.get(PIDS[i], 0) + 1
        assert len(counts) == batch_size // num_instances
        assert set(counts.values()) == {num_instances}


def test_sampler_balanced_and_exact_length():
    s = RandomIdentitySampler(PIDS, batch_size=8, num_instances=2, seed=3)
    for epoch in range(6):
        s.set_epoch(epoch)
        n = len(s)
        indices = list(s)
        assert len(indices) == n == s.num_batches() * 8 and n > 0
        _check_batches(indices, 8, 2)
        multi = [i for i in indices if PIDS.count(PIDS[i]) >= 2]
        assert len(multi) == len(set(multi))  # identities with >= 2 samples: no index twice per epoch
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(1)
    assert list(s) == first  # deterministic in (seed, epoch)
    s.set_epoch(2)
    assert list(s) != first


def test_sampler_oversamples_singletons_and_advances_without_set_epoch():
    s = RandomIdentitySampler(PIDS, batch_size=4, num_instances=2, seed=0)
    seen = set()
    for _ in range(5):
        n = len(s)
        indices = list(s)
        assert len(indices) == n
        _check_batches(indices, 4, 2)
        for start in range(0, len(indices), 2):
            pair = indices[start : start + 2]
            if PIDS[pair[0]] in (1, 7):
                assert pair[0] == pair[1]  # an identity with one sample is drawn twice
        seen.add(tuple(indices))
    assert len(seen) > 1  # the epoch advances by itself


def test_sampler_ddp_split():
    plans = []
    for rank in range(2):
        s = RandomIdentitySampler(PIDS, batch_size=4, num_instances=2, seed=7, num_replicas=2, rank=rank)
        s.set_epoch(4)
        plans.append(list(s))
        assert len(plans[-1]) == len(s)
        _check_batches(plans[-1], 4, 2)
    assert len(plans[0]) == len(plans[1])
    full = RandomIdentitySampler(PIDS, batch_size=4, num_instances=2, seed=7)
    full.set_epoch(4)
    whole = list(full)
    batches = [whole[i : i + 4] for i in range(0, len(whole), 4)]
    assert [plans[0][i : i + 4] for i in range(0, len(plans[0]), 4)] == batches[0 : 2 * (len(batches) // 2) : 2]
    assert [plans[1][i : i + 4] for i in range(0, len(plans[1]), 4)] == batches[1 : 2 * (len(batches) // 2) : 2]


def test_sampler_validation():
    with pytest.raises(ValueError, match="multiple of num_instances"):
        RandomIdentitySampler(PIDS, batch_size=5, num_instances=2)
    with pytest.raises(ValueError, match="only 10"):
        RandomIdentitySampler(PIDS, batch_size=40, num_instances=2)
    with pytest.raises(ValueError, match="rank"):
        RandomIdentitySampler(PIDS, batch_size=4, num_replicas=2, rank=2)


# ------------------------------------------------------------------------------------------------------------------
# synthetic dataset
# ------------------------------------------------------------------------------------------------------------------
SMALL = {"num_ids": 30, "images_per_id": 2, "image_size": (64, 24), "seed": 11}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return generate_synthetic_pedes(root, **SMALL)


def test_synthetic_layout_loads_with_disjoint_splits(synth):
    from PIL import Image

    records = json.loads((synth / "CUHK-PEDES" / "reid_raw.json").read_text())
    d = read_cuhk_pedes(synth, check_files=True)
    ids = {s: {r["id"] for r in records if r["split"] == s} for s in ("train", "val", "test")}
    assert all(ids.values()) and sum(len(v) for v in ids.values()) == 30
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert min(min(v) for v in ids.values()) == 1 and ids["train"] == set(range(1, len(ids["train"]) + 1))
    assert d.num_classes == len(ids["train"]) and len(d.train) == len(ids["train"]) * 2 * 2
    assert len(d.test["img_paths"]) == 2 * len(ids["test"]) and len(d.test["captions"]) == 4 * len(ids["test"])
    with Image.open(d.train[0].img_path) as im:
        assert im.size == (24, 64) and im.mode == "RGB"
    a, b = (np.asarray(Image.open(p)) for p in d.test["img_paths"][:2])  # two images of one identity differ
    assert d.test["image_pids"][0] == d.test["image_pids"][1] and not np.array_equal(a, b)


def test_synthetic_captions_mention_attributes(synth):
    records = json.loads((synth / "CUHK-PEDES" / "reid_raw.json").read_text())
    for rec in records:
        a = rec["attributes"]
        assert len(rec["captions"]) == 2 and rec["captions"][0] != rec["captions"][1]
        for cap in rec["captions"]:
            assert a["upper_colour"] in cap and a["hair_colour"] in cap and a["hair_length"] in cap
            assert re.search(rf"{a['shoe_colour']} (shoes|sneakers|boots)|shoes are {a['shoe_colour']}", cap), cap
            lower = {"trousers": "(trousers|pants)", "shorts": "shorts", "skirt": "skirt"}[a["lower_type"]]
            assert re.search(rf"{a['lower_colour']} {lower}", cap), cap
            if a["upper_pattern"] != "plain":
                assert a["pattern_colour"] in cap
            if a["bag"]:
                assert f"{a['bag_colour']} {a['bag']}" in cap
            else:
                assert "backpack" not in cap and "handbag" not in cap
            if a["hat"]:
                assert re.search(rf"{a['hat']} (hat|cap)", cap), cap
            else:
                assert re.search(r"\b(hat|cap)\b", cap) is None or "no hat" in cap


def test_synthetic_has_detail_only_twins(tmp_path):
    root = generate_synthetic_pedes(tmp_path, num_ids=40, images_per_id=1, image_size=(32, 16), seed=2)
    records = json.loads((root / "CUHK-PEDES" / "reid_raw.json").read_text())
    attrs = {r["id"]: (r["split"], r["attributes"]) for r in records}
    details = {"bag", "bag_colour", "shoe_colour", "hat"}
    twins = 0
    ids = sorted(attrs)
    for i in ids:
        for j in ids:
            if i < j:
                (si, ai), (sj, aj) = attrs[i], attrs[j]
                diff = {k for k in ai if ai[k] != aj[k]} - {"bag_side"}
                if diff and diff <= details:
                    twins += 1
                    assert si == sj  # near-twins share a split
    assert twins >= 5


def test_synthetic_deterministic_and_guarded(synth, tmp_path):
    again = generate_synthetic_pedes(tmp_path / "again", **SMALL)
    a = (synth / "CUHK-PEDES" / "reid_raw.json").read_bytes()
    assert a == (again / "CUHK-PEDES" / "reid_raw.json").read_bytes()
    for rec in json.loads(a)[:6]:
        p = Path("CUHK-PEDES") / "imgs" / rec["file_path"]
        assert (synth / p).read_bytes() == (again / p).read_bytes()
    other = generate_synthetic_pedes(tmp_path / "other", **{**SMALL, "seed": 12})
    assert (other / "CUHK-PEDES" / "reid_raw.json").read_bytes() != a
    # cached root: the same parameters do not regenerate
    stamp = (again / "CUHK-PEDES" / "reid_raw.json").stat().st_mtime_ns
    assert synthetic_pedes_root(again, **SMALL) == again
    assert (again / "CUHK-PEDES" / "reid_raw.json").stat().st_mtime_ns == stamp
    # a real dataset is never overwritten
    real = tmp_path / "real"
    _write(real, "CUHK-PEDES", [])
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        generate_synthetic_pedes(real, **SMALL)
    with pytest.raises(ValueError, match="num_ids"):
        generate_synthetic_pedes(tmp_path / "x", num_ids=2)


def test_datasets_and_loader_on_synthetic(synth):
    d = read_cuhk_pedes(synth)
    ds = PedesTrainDataset(d.train, build_train_transform((64, 24)), text_augment=True)
    item = ds[3]
    assert item["images"].shape == (3, 64, 24) and item["caption_ids"].shape == (77,)
    assert item["pids"].item() == d.train[3].pid and item["image_ids"].item() == d.train[3].image_id
    sampler = RandomIdentitySampler(ds, batch_size=8, num_instances=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler, drop_last=True)
    assert len(loader) == sampler.num_batches()
    batch = next(iter(loader))
    assert batch["images"].shape == (8, 3, 64, 24) and batch["caption_ids"].shape == (8, 77)
    assert sorted(torch.bincount(batch["pids"]).unique().tolist()) in ([0, 2], [2])
    img_ds = ImageDataset(d.test["image_pids"], d.test["img_paths"], build_test_transform((64, 24)))
    pid, img = img_ds[0]
    assert pid.item() == d.test["image_pids"][0] and img.shape == (3, 64, 24)
    txt_ds = TextDataset(d.test["caption_pids"], d.test["captions"])
    pid, ids = txt_ds[1]
    assert pid.item() == d.test["caption_pids"][1] and torch.equal(ids, tokenize(d.test["captions"][1]))
    with pytest.raises(ValueError, match="same length"):
        ImageDataset([1, 2], ["a"])
