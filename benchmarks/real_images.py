"""Real photographs that installed packages ship, for fidelity benchmarks: nothing is downloaded.

Three kinds, each optional:

``skimage``
    The images bundled inside scikit-image's wheel (``skimage/data/*``; the loaders check their hashes; the many
    ``skimage.data`` images that pooch fetches from the internet are never asked for). Nine colour photographs
    (astronaut, chelsea, coffee, rocket, the two views of the stereo motorcycle, hubble_deep_field,
    immunohistochemistry, retina), then four greyscale photographs (camera, coins, moon, clock) repeated over three
    channels: 13 in all.
``matplotlib``
    Matplotlib's bundled sample data (``mpl-data/sample_data``): ``grace_hopper.jpg`` and the MRI slice
    ``s1045.ima.gz`` (256x256 uint16, scaled by its maximum). The other files there are clip art, plots' data or
    elevation models.
``vtest``
    Pedestrians cropped from OpenCV's sample video ``vtest.avi`` (Debian's ``opencv-doc``:
    ``/usr/share/doc/opencv-doc/examples/data/vtest.avi``, 795 frames of 768x576) by OpenCV's HOG people detector
    (``cv2.HOGDescriptor_getDefaultPeopleDetector()``, which OpenCV 5 no longer has in its main modules: needs
    ``opencv-python-headless<5``) on frames 0, 50, ..., 750; detections with an SVM score of at least 1.0, without
    overlaps (IoU above 0.5 with a stronger one), sorted by frame, then x, then y.

:func:`load_images` returns ``(name, RGB PIL image)`` pairs, names unique (``"<kind>/<what>"``); :func:`available`
says which kinds can load here and why the others cannot. Everything is deterministic.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

log = logging.getLogger(__name__)

KINDS = ("skimage", "matplotlib", "vtest")
INSTALL_HINT = "pip install 'attnselect[real]'"

#: ``skimage.data`` loaders whose files are inside the wheel: colour photographs first, then greyscale ones
SKIMAGE_COLOR = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field",
                 "immunohistochemistry", "retina")  # fmt: skip
SKIMAGE_GRAY = ("camera", "coins", "moon", "clock")
#: files of ``matplotlib.cbook.get_sample_data`` that are images of the real world
MATPLOTLIB_FILES = ("grace_hopper.jpg", "s1045.ima.gz")

#: where ``vtest.avi`` is looked for (``$OPENCV_SAMPLES_DATA_PATH`` first, when set)
VTEST_PATHS = (
    "/usr/share/doc/opencv-doc/examples/data/vtest.avi",
    "/usr/share/doc/opencv-doc/examples/data/vtest.avi.gz",
    "/usr/share/opencv4/samples/data/vtest.avi",
)
VTEST_FRAMES = tuple(range(0, 751, 50))
#: HOG detectMultiScale settings, the minimum SVM score kept, and the overlap above which the weaker box is dropped
HOG_PARAMS = {"winStride": (8, 8), "padding": (8, 8), "scale": 1.05}
HOG_MIN_SCORE = 1.0
HOG_MAX_IOU = 0.5


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def find_vtest() -> Path | None:
    """The path of OpenCV's ``vtest.avi`` (or ``vtest.avi.gz``) on this machine, or None."""
    candidates = [Path(p) / "vtest.avi" for p in os.environ.get("OPENCV_SAMPLES_DATA_PATH", "").split(os.pathsep) if p]
    candidates += [Path(p) for p in VTEST_PATHS]
    return next((p for p in candidates if p.is_file()), None)


def available() -> dict[str, str | None]:
    """Each kind -> why it cannot load here (a sentence naming what to install), or None when it can."""
    reasons: dict[str, str | None] = {}
    pil = None if _has("PIL") else f"Pillow is not installed ({INSTALL_HINT})"
    reasons["skimage"] = pil or (None if _has("skimage") else f"scikit-image is not installed ({INSTALL_HINT})")
    reasons["matplotlib"] = pil or (None if _has("matplotlib") else f"matplotlib is not installed ({INSTALL_HINT})")
    reason = pil
    if reason is None and not _has("cv2"):
        reason = f"OpenCV is not installed ({INSTALL_HINT})"
    if reason is None:
        cv2 = importlib.import_module("cv2")
        if not hasattr(cv2, "HOGDescriptor"):
            reason = (f"OpenCV {cv2.__version__} has no HOGDescriptor (gone from OpenCV 5's main modules): "
                      "pip install 'opencv-python-headless>=4.8,<5'")  # fmt: skip
    if reason is None and find_vtest() is None:
        reason = "vtest.avi not found: apt-get install opencv-doc (or set OPENCV_SAMPLES_DATA_PATH)"
    reasons["vtest"] = reason
    return reasons


def _rgb(array: np.ndarray) -> Image.Image:
    """An (H, W) or (H, W, 3|4) array (uint8, or floats/ints scaled by their maximum) -> an RGB PIL image."""
    from PIL import Image as PILImage

    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = np.clip(np.round(255.0 * a / max(float(a.max()), 1e-12)), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return PILImage.fromarray(np.ascontiguousarray(a[:, :, :3]), mode="RGB")


def _skimage() -> Iterable[tuple[str, Image.Image]]:
    from skimage import data

    for name in SKIMAGE_COLOR:
        if name == "stereo_motorcycle":
            left, right, _ = data.stereo_motorcycle()
            yield "skimage/motorcycle_left", _rgb(left)
            yield "skimage/motorcycle_right", _rgb(right)
        else:
            yield f"skimage/{name}", _rgb(getattr(data, name)())
    for name in SKIMAGE_GRAY:
        yield f"skimage/{name}", _rgb(getattr(data, name)())


def _matplotlib() -> Iterable[tuple[str, Image.Image]]:
    from matplotlib import cbook
    from PIL import Image as PILImage

    for fname in MATPLOTLIB_FILES:
        stem = fname.split(".")[0]
        if fname == "s1045.ima.gz":  # raw 256x256 uint16, as matplotlib's own examples read it
            with cbook.get_sample_data(fname) as f:
                raw = f.read()
            yield f"matplotlib/{stem}", _rgb(np.frombuffer(raw, np.uint16).reshape(256, 256))
        else:
            with cbook.get_sample_data(fname) as f:
                yield f"matplotlib/{stem}", PILImage.open(f).convert("RGB")


def _iou(a: Sequence[int], b: Sequence[int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / float(aw * ah + bw * bh - inter)


def detect_people(frame: np.ndarray, hog: Any = None) -> list[tuple[int, int, int, int]]:
    """HOG people boxes ``(x, y, w, h)`` in a BGR ``(H, W, 3)`` uint8 frame, clipped to it, sorted by x then y.

    Boxes with an SVM score below :data:`HOG_MIN_SCORE` are dropped, then any box overlapping a stronger one by an
    IoU above :data:`HOG_MAX_IOU`.
    """
    import cv2

    if hog is None:
        hog = cv2.HOGDescriptor()
        hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    rects, weights = hog.detectMultiScale(frame, **HOG_PARAMS)
    h, w = frame.shape[:2]
    boxes = []
    for (x, y, bw, bh), score in zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).reshape(-1)):
        if score < HOG_MIN_SCORE:
            continue
        x0, y0 = max(0, int(x)), max(0, int(y))
        x1, y1 = min(w, int(x) + int(bw)), min(h, int(y) + int(bh))
        if x1 > x0 and y1 > y0:
            boxes.append((float(score), (x0, y0, x1 - x0, y1 - y0)))
    kept: list[tuple[int, int, int, int]] = []
    for _, box in sorted(boxes, key=lambda sb: (-sb[0], sb[1])):
        if all(_iou(box, k) <= HOG_MAX_IOU for k in kept):
            kept.append(box)
    return sorted(kept)


def _open_video(path: Path) -> tuple[Any, Path | None]:
    """A cv2.VideoCapture of ``path``; a ``.gz`` is unpacked to a temporary file first (returned to delete)."""
    import tempfile

    import cv2

    tmp = None
    if path.suffix == ".gz":
        fd, name = tempfile.mkstemp(suffix=".avi")
        tmp = Path(name)
        with os.fdopen(fd, "wb") as out, gzip.open(path, "rb") as src:
            out.write(src.read())
        path = tmp
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise OSError(f"OpenCV cannot read {path}")
    return cap, tmp


def _vtest(limit: int | None = None) -> Iterable[tuple[str, Image.Image]]:
    import cv2
    from PIL import Image as PILImage

    path = find_vtest()
    assert path is not None
    hog = cv2.HOGDescriptor()
    hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    cap, tmp = _open_video(path)
    wanted = set(VTEST_FRAMES)
    count = 0
    try:
        index = 0
        while index <= max(VTEST_FRAMES) and (limit is None or count < limit):
            ok, frame = cap.read()  # read in order: seeking is not frame-exact with every backend
            if not ok:
                log.warning("vtest.avi ended at frame %d, before frame %d", index, max(VTEST_FRAMES))
                break
            if index in wanted:
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                for x, y, w, h in detect_people(frame, hog):
                    yield f"vtest/f{index:03d}_x{x:03d}_y{y:03d}", PILImage.fromarray(rgb[y : y + h, x : x + w])
                    count += 1
            index += 1
    finally:
        cap.release()
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def load_images(kinds: Sequence[str] = KINDS, max_per_kind: int | None = None) -> list[tuple[str, Image.Image]]:
    """``(name, image)`` pairs of the available kinds, in the order of ``kinds``; images are RGB ``PIL.Image``.

    ``max_per_kind`` keeps the first that many of each kind. A kind that cannot load here (:func:`available`) is
    skipped with its reason logged at WARNING; an unknown kind raises ValueError.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; known: {KINDS}")
    reasons = available()
    out: list[tuple[str, Image.Image]] = []
    for kind in kinds:
        if reasons[kind] is not None:
            log.warning("skipping %s images: %s", kind, reasons[kind])
            continue
        if kind == "vtest":
            items = _vtest(max_per_kind)
        else:
            items = _skimage() if kind == "skimage" else _matplotlib()
        got = []
        for item in items:
            if max_per_kind is not None and len(got) >= max_per_kind:
                break
            got.append(item)
        log.info("%d %s images", len(got), kind)
        out.extend(got)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--max-per-kind", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also save each image here as PNG")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for kind, why in available().items():
        print(f"{kind}: {'available' if why is None else why}")
    images = load_images(args.kinds, args.max_per_kind)
    for name, img in images:
        print(f"{name}: {img.size[0]}x{img.size[1]} {img.mode}")
        if args.out is not None:
            target = args.out / f"{name.replace('/', '_')}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            img.save(target)
    print(f"{len(images)} images")
