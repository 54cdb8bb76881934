"""Readers for the text-based person search benchmarks CUHK-PEDES, ICFG-PEDES and RSTPReid.

Each reader takes the data root (the folder holding ``CUHK-PEDES/``, ``ICFG-PEDES/`` or ``RSTPReid/``; the dataset
folder itself is accepted too) and returns a :class:`PedesData`:

- ``train``: one :class:`TrainSample` ``(pid, image_id, img_path, caption)`` per caption, pids 0-based and exactly
  ``0..C-1`` (checked), ``image_id`` a running index over training images;
- ``val`` / ``test``: dicts with ``image_pids``, ``img_paths`` (one per image) and ``caption_pids``, ``captions``
  (one per caption), the identities as stored in the file (only equality matters for evaluation).

Records whose split is neither ``"train"`` nor ``"test"`` go to ``val``, as in the published loaders. Image paths are
relative to ``<dataset>/imgs``; a path leaving that folder, a malformed record or (with ``check_files=True``) a
missing image raises an error naming the record index. Layouts: ``docs/data.md``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "DATASETS",
    "PedesData",
    "TrainSample",
    "load_pedes",
    "read_cuhk_pedes",
    "read_icfg_pedes",
    "read_rstpreid",
]

logger = logging.getLogger(__name__)


class TrainSample(NamedTuple):
    """One training caption: identity (0-based), running image index, absolute image path, caption.

    Examples:
        >>> sample = TrainSample(pid=0, image_id=3, img_path="/data/imgs/a.jpg", caption="a man in red")
        >>> sample.pid, sample.caption
        (0, 'a man in red')
    """

    pid: int
    image_id: int
    img_path: str
    caption: str


def _empty_eval() -> dict[str, list]:
    return {"image_pids": [], "img_paths": [], "caption_pids": [], "captions": []}


@dataclass
class PedesData:
    """A dataset read from its annotation file.

    Attributes:
        name: dataset name (``"CUHK-PEDES"``, ``"ICFG-PEDES"``, ``"RSTPReid"``).
        root: the dataset folder (the one holding the annotation file and ``imgs/``).
        train: training samples, one per caption.
        val: ``{"image_pids", "img_paths", "caption_pids", "captions"}`` (may be empty).
        test: same keys as ``val``.
        num_classes: number of training identities C.

    Examples:
        >>> import tempfile
        >>> from attnselect.data import generate_synthetic_pedes, read_cuhk_pedes
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     data = read_cuhk_pedes(generate_synthetic_pedes(tmp, num_ids=6, images_per_id=2, image_size=(32, 16)))
        >>> data.name, data.num_classes, len(data.train), sorted(data.test)
        ('CUHK-PEDES', 4, 16, ['caption_pids', 'captions', 'image_pids', 'img_paths'])
    """

    name: str
    root: Path
    train: list[TrainSample] = field(default_factory=list)
    val: dict[str, list] = field(default_factory=_empty_eval)
    test: dict[str, list] = field(default_factory=_empty_eval)
    num_classes: int = 0

    def summary(self) -> str:
        """One line per split with identity, image and caption counts."""
        lines = [f"{self.name} at {self.root}"]
        n_img = len({s.image_id for s in self.train})
        lines.append(f"  train: {self.num_classes} ids, {n_img} images, {len(self.train)} captions")
        for split in ("val", "test"):
            d = getattr(self, split)
            lines.append(
                f"  {split}: {len(set(d['image_pids']))} ids, {len(d['img_paths'])} images, "
                f"{len(d['captions'])} captions"
            )
        return "\n".join(lines)


# name -> (folder, annotation file, image path key, train id offset)
DATASETS: dict[str, tuple[str, str, str, int]] = {
    "CUHK-PEDES": ("CUHK-PEDES", "reid_raw.json", "file_path", 1),
    "ICFG-PEDES": ("ICFG-PEDES", "ICFG-PEDES.json", "file_path", 0),
    "RSTPReid": ("RSTPReid", "data_captions.json", "img_path", 0),
}
_ALIASES = {
    "cuhk-pedes": "CUHK-PEDES",
    "cuhkpedes": "CUHK-PEDES",
    "cuhk": "CUHK-PEDES",
    "icfg-pedes": "ICFG-PEDES",
    "icfgpedes": "ICFG-PEDES",
    "icfg": "ICFG-PEDES",
    "rstpreid": "RSTPReid",
    "rstp": "RSTPReid",
}


# other names an annotation file goes by (the ICFG-PEDES README spells it with an underscore)
_ANNOTATION_ALIASES = {"ICFG-PEDES.json": ("ICFG_PEDES.json",)}


def _dataset_dir(root: str | os.PathLike, folder: str, anno: str) -> tuple[Path, str]:
    root = Path(root).expanduser()
    for name in (anno, *_ANNOTATION_ALIASES.get(anno, ())):
        for candidate in (root / folder, root):
            if (candidate / name).is_file():
                return candidate, name
    raise FileNotFoundError(
        f"annotation file {anno!r} not found under {root / folder} or {root}; expected the layout "
        f"<root>/{folder}/{anno} with images under <root>/{folder}/imgs/ (see docs/data.md)"
    )


def _resolve_image(img_root: Path, rel: Any, index: int, key: str, check_files: bool) -> str:
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"record {index}: {key!r} must be a non-empty string path, got {rel!r}")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        raise ValueError(f"record {index}: {key!r} = {rel!r} is absolute; paths must be relative to {img_root}")
    full = os.path.normpath(os.path.join(img_root, rel))
    base = os.path.normpath(img_root)
    if os.path.commonpath([full, base]) != base:
        raise ValueError(f"record {index}: {key!r} = {rel!r} escapes the image folder {img_root}")
    if check_files and not os.path.isfile(full):
        raise FileNotFoundError(f"record {index}: image {full} ({key!r} = {rel!r}) does not exist")
    return full


def _parse_record(rec: Any, index: int, path_key: str) -> tuple[str, int, list[str], str]:
    if not isinstance(rec, dict):
        raise ValueError(f"record {index}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("split", "captions", path_key, "id") if k not in rec]
    if missing:
        raise ValueError(f"record {index}: missing key(s) {missing}; has {sorted(rec)}")
    split = rec["split"]
    if not isinstance(split, str):
        raise ValueError(f"record {index}: 'split' must be a string, got {split!r}")
    pid = rec["id"]
    if isinstance(pid, bool) or not isinstance(pid, int | str):
        raise ValueError(f"record {index}: 'id' must be an integer, got {pid!r}")
    try:
        pid = int(pid)
    except ValueError:
        raise ValueError(f"record {index}: 'id' must be an integer, got {rec['id']!r}") from None
    caps = rec["captions"]
    if isinstance(caps, str):
        caps = [caps]
    if not isinstance(caps, list) or not caps:
        raise ValueError(f"record {index}: 'captions' must be a non-empty list of strings, got {caps!r}")
    for c in caps:
        if not isinstance(c, str):
            raise ValueError(f"record {index}: every caption must be a string, got {c!r}")
    return split, pid, caps, rec[path_key]


def _read(name: str, root: str | os.PathLike, check_files: bool) -> PedesData:
    folder, anno, path_key, offset = DATASETS[name]
    ddir, anno = _dataset_dir(root, folder, anno)
    img_root = ddir / "imgs"
    with open(ddir / anno, encoding="utf-8") as fh:
        try:
            records = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{ddir / anno}: not valid JSON ({exc})") from exc
    if not isinstance(records, list):
        raise ValueError(f"{ddir / anno}: expected a JSON list of records, got {type(records).__name__}")

    data = PedesData(name=name, root=ddir)
    image_id = 0
    train_pids: set[int] = set()
    blank: list[int] = []  # records with captions that hold no text: those captions are left out
    for index, rec in enumerate(records):
        split, pid, caps, rel = _parse_record(rec, index, path_key)
        if not all(c.strip() for c in caps):
            blank.append(index)
            caps = [c for c in caps if c.strip()]
        img_path = _resolve_image(img_root, rel, index, path_key, check_files)
        if split == "train":
            pid -= offset
            if pid < 0:
                raise ValueError(
                    f"record {index}: training id {pid + offset} gives a negative 0-based pid "
                    f"({name} training ids start at {offset})"
                )
            train_pids.add(pid)
            data.train.extend(TrainSample(pid, image_id, img_path, c) for c in caps)
            image_id += bool(caps)
        else:
            target = data.test if split == "test" else data.val
            target["image_pids"].append(pid)
            target["img_paths"].append(img_path)
            target["caption_pids"].extend([pid] * len(caps))
            target["captions"].extend(caps)
    if blank:
        logger.warning(
            "%s: left out the empty or blank captions of %d record(s) (e.g. records %s); their images stay",
            ddir / anno,
            len(blank),
            blank[:5],
        )
    if train_pids:
        expected = set(range(len(train_pids)))
        if train_pids != expected:
            gaps = sorted(expected - train_pids)[:10]
            raise ValueError(
                f"{ddir / anno}: training pids must be exactly 0..C-1 after the 0-based shift; "
                f"{len(train_pids)} distinct pids, max {max(train_pids)}, missing e.g. {gaps}"
            )
    data.num_classes = len(train_pids)
    logger.info("%s", data.summary())
    return data


def read_cuhk_pedes(root: str | os.PathLike, *, check_files: bool = False) -> PedesData:
    """CUHK-PEDES: ``CUHK-PEDES/reid_raw.json`` (keys split, captions, file_path, id 1-based), ``imgs/``.

    Training ids are shifted to 0-based (``id - 1``); val/test ids are kept as stored.

    Args:
        root: the data root (holding ``CUHK-PEDES/``) or the dataset folder itself.
        check_files: raise ``FileNotFoundError`` when an image listed in the annotations is missing.

    Returns:
        The :class:`PedesData`.

    Examples:
        >>> import json, tempfile
        >>> from pathlib import Path
        >>> records = [{"split": "train", "id": 1, "file_path": "a.jpg", "captions": ["a man in red"]},
        ...            {"split": "test", "id": 5, "file_path": "b.jpg", "captions": ["a woman", "a lady"]}]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     (Path(tmp) / "CUHK-PEDES").mkdir()
        ...     _ = (Path(tmp) / "CUHK-PEDES" / "reid_raw.json").write_text(json.dumps(records))
        ...     data = read_cuhk_pedes(tmp)
        >>> data.num_classes, data.train[0].pid, data.test["caption_pids"]
        (1, 0, [5, 5])
    """
    return _read("CUHK-PEDES", root, check_files)


def read_icfg_pedes(root: str | os.PathLike, *, check_files: bool = False) -> PedesData:
    """ICFG-PEDES: ``ICFG-PEDES/ICFG-PEDES.json`` (keys split, captions, file_path, id 0-based), ``imgs/``.

    The file is also found as ``ICFG_PEDES.json`` (the name the dataset's README uses) when ``ICFG-PEDES.json``
    is absent.

    Args:
        root: the data root (holding ``ICFG-PEDES/``) or the dataset folder itself.
        check_files: raise ``FileNotFoundError`` when an image listed in the annotations is missing.

    Returns:
        The :class:`PedesData`.

    Examples:
        >>> import json, tempfile
        >>> from pathlib import Path
        >>> records = [{"split": "train", "id": 0, "file_path": "a.jpg", "captions": ["a man in red"]},
        ...            {"split": "test", "id": 5, "file_path": "b.jpg", "captions": ["a woman", "a lady"]}]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     (Path(tmp) / "ICFG-PEDES").mkdir()
        ...     _ = (Path(tmp) / "ICFG-PEDES" / "ICFG-PEDES.json").write_text(json.dumps(records))
        ...     data = read_icfg_pedes(tmp)
        >>> data.num_classes, data.train[0].pid, data.test["caption_pids"]
        (1, 0, [5, 5])
    """
    return _read("ICFG-PEDES", root, check_files)


def read_rstpreid(root: str | os.PathLike, *, check_files: bool = False) -> PedesData:
    """RSTPReid: ``RSTPReid/data_captions.json`` (keys split, captions, img_path, id 0-based), ``imgs/``.

    Args:
        root: the data root (holding ``RSTPReid/``) or the dataset folder itself.
        check_files: raise ``FileNotFoundError`` when an image listed in the annotations is missing.

    Returns:
        The :class:`PedesData`.

    Examples:
        >>> import json, tempfile
        >>> from pathlib import Path
        >>> records = [{"split": "train", "id": 0, "img_path": "a.jpg", "captions": ["a man in red"]},
        ...            {"split": "test", "id": 5, "img_path": "b.jpg", "captions": ["a woman", "a lady"]}]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     (Path(tmp) / "RSTPReid").mkdir()
        ...     _ = (Path(tmp) / "RSTPReid" / "data_captions.json").write_text(json.dumps(records))
        ...     data = read_rstpreid(tmp)
        >>> data.num_classes, data.train[0].pid, data.test["caption_pids"]
        (1, 0, [5, 5])
    """
    return _read("RSTPReid", root, check_files)


def load_pedes(name: str, root: str | os.PathLike, *, check_files: bool = False) -> PedesData:
    """Read a dataset by name (``CUHK-PEDES``, ``ICFG-PEDES``, ``RSTPReid``; case-insensitive short forms too).

    Args:
        name: the dataset name, e.g. ``"CUHK-PEDES"``, ``"cuhk"``, ``"icfg"``, ``"rstp"``.
        root: the data root.
        check_files: raise ``FileNotFoundError`` when an image listed in the annotations is missing.

    Returns:
        The :class:`PedesData`.

    Examples:
        >>> import tempfile
        >>> from attnselect.data import generate_synthetic_pedes
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     root = generate_synthetic_pedes(tmp, num_ids=6, images_per_id=2, image_size=(32, 16))
        ...     data = load_pedes("cuhk", root)
        >>> data.name
        'CUHK-PEDES'
    """
    key = _ALIASES.get(name.lower().replace("_", "-"), name)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return _read(key, root, check_files)
