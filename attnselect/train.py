"""Training and evaluation engine of the reference ITSELF model (shared by ``attnselect train|eval|demo`` and
``examples/train_itself.py``).

- Configuration: :class:`TrainConfig` (with the model's :class:`~attnselect.models.ITSELFConfig` in ``model``), read
  from a YAML/JSON file and/or command-line flags (flags win). Defaults are the published recipe.
- Optimiser: Adam(0.9, 0.999, eps 1e-3), lr 1e-5, weight decay 4e-5; biases x2 lr and no decay; classifiers x5;
  bank adapters an absolute 1e-3; 5-epoch linear warm-up from 0.1 then cosine, stepped per epoch.
- Precision: fp32 master weights with bf16/fp16 autocast (GradScaler for fp16); the losses run in fp32.
- Distributed: ``torchrun --nproc_per_node=N`` runs DistributedDataParallel (nccl on GPU, gloo on CPU).
  ``batch_size`` is the global batch: every step the identity sampler draws one global batch and each rank takes
  its contiguous slice, and the losses gather features over ranks, so N processes take the same steps as one
  process with the whole batch (up to the per-rank statistics of the adapters' BatchNorm).
- Output (``out_dir``): ``metrics.jsonl`` (one JSON line per epoch), ``checkpoints/{last,best}/`` holding
  ``model.safetensors``, ``train_state.pt`` (optimiser, LR schedule, ATS step, epoch, RNG; loadable with
  ``torch.load(weights_only=True)``) and ``config.json``. ``resume`` restores all of it.

Usage and options: ``docs/itself.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
import types
import typing
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from .models.itself import ITSELF, ITSELFConfig, json_ready

__all__ = [
    "TrainConfig",
    "build_optimizer",
    "demo",
    "demo_config",
    "demo_main",
    "encode_split",
    "eval_main",
    "evaluate",
    "format_metrics_table",
    "load_checkpoint",
    "load_model",
    "lr_factor",
    "main",
    "parse_args",
    "save_checkpoint",
    "tiny_config",
    "train",
    "train_main",
]

logger = logging.getLogger(__name__)

DATASET_NAMES = {"synthetic": "CUHK-PEDES", "cuhk": "CUHK-PEDES", "icfg": "ICFG-PEDES", "rstp": "RSTPReid"}


@dataclass
class TrainConfig:
    """A training / evaluation run. Defaults follow the published ITSELF recipe (section 7 of the reference).

    Every field is also a command-line flag (``--batch-size``, ``--lr``, ...; see :func:`parse_args`).

    Examples:
        >>> cfg = TrainConfig(dataset="rstp", root="data", epochs=10)
        >>> cfg.batch_size, cfg.optimizer, cfg.model.image_size
        (256, 'adam', (384, 128))
        >>> TrainConfig(**cfg.to_dict()) == cfg  # round-trips through JSON-friendly dicts
        True
    """

    model: ITSELFConfig = field(default_factory=ITSELFConfig)  # the model (num_classes is set from the data)
    # --- data ---
    dataset: str = "synthetic"  # synthetic | cuhk | icfg | rstp
    root: str | None = None  # data root (synthetic: default <out_dir>/data, generated when missing)
    synthetic_ids: int = 200  # synthetic identities over all splits
    synthetic_images_per_id: int = 4  # synthetic images per identity
    synthetic_captions_per_image: int = 2  # synthetic captions per image
    synthetic_image_size: tuple[int, int] = (128, 48)  # synthetic image (H, W) before resizing to the model input
    synthetic_seed: int = 0  # synthetic generator seed
    augment: bool = True  # image augmentation (flip, pad + crop, random erasing)
    text_augment: bool = True  # caption augmentation (mask / replace / delete 20 % of the words)
    sampler: str = "identity"  # identity (P ids x num_instances per batch, published) or random
    num_instances: int = 2  # captions per identity in a batch (identity sampler)
    batch_size: int = 256  # GLOBAL batch size (split over DDP ranks)
    eval_batch_size: int = 256  # batch size of the encoders at evaluation
    num_workers: int = 4  # DataLoader worker processes per rank
    # --- optimisation ---
    epochs: int = 60  # training epochs
    optimizer: str = "adam"  # adam (published) or adamw
    lr: float = 1e-5  # base learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    eps: float = 1e-3  # Adam epsilon (published 1e-3, inherited from fp16 training)
    weight_decay: float = 4e-5  # weight decay of weights
    bias_lr_factor: float = 2.0  # lr multiplier of parameters whose name contains "bias"
    bias_weight_decay: float = 0.0  # weight decay of biases
    classifier_lr_factor: float = 5.0  # lr multiplier of the identity / pair classifiers
    adapter_lr: float | None = 1e-3  # absolute lr of the bank adapters and pools (None: the base lr rules)
    lr_schedule: str = "cosine"  # cosine (to 0) or constant, after the warm-up; stepped once per epoch
    warmup_epochs: int = 5  # linear warm-up epochs
    warmup_factor: float = 0.1  # lr factor at the first warm-up epoch
    grad_clip: float | None = None  # max gradient norm (None: no clipping)
    precision: str = "auto"  # auto (bf16 on a bf16-capable GPU, else fp32), fp32, bf16, fp16
    ats_epochs: float | None = None  # if set, ATS length T = ats_epochs x steps per epoch (overrides ats_total_steps)
    max_steps_per_epoch: int | None = None  # cut every epoch after this many steps (quick runs)
    time_budget_s: float | None = None  # stop training after this many seconds (then evaluate and save)
    stop_after: int | None = None  # stop after this many epochs in total (the LR schedule still spans `epochs`)
    # --- evaluation and output ---
    out_dir: str = "outputs/itself"  # metrics.jsonl, checkpoints/, figures
    eval_every: int = 1  # evaluate every this many epochs (0: only at the end)
    eval_split: str = "val"  # split used for model selection (test when the dataset has no val split)
    test_at_end: bool = True  # evaluate the final model on the test split
    save_every: int = 1  # write checkpoints/last every this many epochs (0: only at the end)
    resume: str | None = None  # checkpoint folder to resume from, or "auto" (<out_dir>/checkpoints/last if present)
    seed: int = 1  # random seed (each rank adds its rank)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    threads: int | None = None  # torch CPU threads per process (None: torch default)
    log_every: int = 50  # log the running loss every this many steps
    progress: bool = True  # tqdm progress bars (rank 0)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ITSELFConfig(**self.model)
        if self.dataset not in DATASET_NAMES:
            raise ValueError(f"dataset must be one of {sorted(DATASET_NAMES)}, got {self.dataset!r}")
        if self.sampler not in ("identity", "random"):
            raise ValueError(f"sampler must be 'identity' or 'random', got {self.sampler!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.eval_split not in ("val", "test"):
            raise ValueError(f"eval_split must be 'val' or 'test', got {self.eval_split!r}")
        for name in ("batch_size", "eval_batch_size", "epochs", "num_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sampler == "identity" and self.batch_size % self.num_instances:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of num_instances ({self.num_instances})"
            )
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.synthetic_image_size = tuple(int(s) for s in self.synthetic_image_size)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict; ``TrainConfig(**d)`` rebuilds it."""
        return json_ready(dataclasses.asdict(self))


# ================================================================================================================
# configuration from files and flags
# ================================================================================================================
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007
    return tp, False


def _scalar(text: str) -> Any:
    """int, float or str from a command-line token."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _none_or(conv):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else conv(text)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, prefix: str, skip: Sequence[str] = ()) -> None:
    group = parser.add_argument_group(f"{cls.__name__} fields")
    for name, tp in _field_types(cls).items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        dest = f"{prefix}{name}"
        base, optional = _strip_optional(tp)
        origin = typing.get_origin(base)
        if base is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif base in (int, float, str):
            conv = _none_or(base) if optional else base
            group.add_argument(flag, dest=dest, type=conv, default=argparse.SUPPRESS, metavar=base.__name__.upper())
        elif origin is tuple:
            args = typing.get_args(base)
            nargs: Any = "+" if (len(args) == 2 and args[1] is Ellipsis) else len(args)
            elem = args[0]
            conv = elem if elem in (int, float, str) else _scalar
            group.add_argument(flag, dest=dest, type=conv, nargs=nargs, default=argparse.SUPPRESS)
        elif origin is dict or base is dict:
            group.add_argument(flag, dest=dest, type=json.loads, default=argparse.SUPPRESS, metavar="JSON")
        else:
            conv = _none_or(_scalar) if optional else _scalar
            group.add_argument(flag, dest=dest, type=conv, default=argparse.SUPPRESS)


def _check_flag_names() -> None:
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    model_names = {f.name for f in dataclasses.fields(ITSELFConfig)}
    clash = train_names & model_names
    if clash:  # pragma: no cover - a development-time guard
        raise RuntimeError(f"TrainConfig and ITSELFConfig share field names {sorted(clash)}")


def build_parser(prog: str = "train_itself") -> argparse.ArgumentParser:
    """Flags for every :class:`TrainConfig` and :class:`ITSELFConfig` field, plus ``--config``, ``--demo``,
    ``--eval-only`` and ``--out`` (alias of ``--out-dir``)."""
    _check_flag_names()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train / evaluate the reference ITSELF model. Values: defaults < --config file < flags.",
    )
    parser.add_argument("--config", help="YAML or JSON file with TrainConfig fields (model fields under 'model:')")
    parser.add_argument("--demo", action="store_true", help="the small CPU demo preset (see attnselect.train.demo)")
    parser.add_argument("--demo-seconds", type=float, default=120.0, help="demo training time budget")
    parser.add_argument("--eval-only", action="store_true", help="evaluate --resume (or the --pretrained model)")
    parser.add_argument("--out", dest="train.out_dir", default=argparse.SUPPRESS, help="alias of --out-dir")
    _add_dataclass_flags(parser, TrainConfig, "train.", skip=("model",))
    _add_dataclass_flags(parser, ITSELFConfig, "model.")
    return parser


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or JSON file as a dict of :class:`TrainConfig` fields."""
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(data).__name__}")
    return data


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a (nested) dict; unknown keys raise a ValueError naming them."""
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    model_names = {f.name for f in dataclasses.fields(ITSELFConfig)}
    data = dict(data)
    model = dict(data.pop("model", None) or {})
    unknown = [k for k in data if k not in train_names]
    unknown += [f"model.{k}" for k in model if k not in model_names]
    if unknown:
        raise ValueError(f"unknown configuration keys {unknown}")
    return TrainConfig(model=ITSELFConfig(**model), **data)


def parse_args(
    argv: Sequence[str] | None = None, *, prog: str = "train_itself"
) -> tuple[TrainConfig, argparse.Namespace]:
    """Parse flags (and the ``--config`` file) into a :class:`TrainConfig`; also returns the raw namespace.

    Args:
        argv: the flags (default ``sys.argv[1:]``); one per :class:`TrainConfig` and
            :class:`~attnselect.models.ITSELFConfig` field, plus ``--config``, ``--demo``, ``--eval-only``, ``--out``.
        prog: program name for the help text.

    Returns:
        ``(config, namespace)``; values come from the defaults, then the ``--config`` file, then the flags.

    Examples:
        >>> cfg, ns = parse_args(["--epochs", "3", "--lr", "2e-5", "--selection", "consistent"])
        >>> cfg.epochs, cfg.lr, cfg.model.selection, ns.demo
        (3, 2e-05, 'consistent', False)
    """
    parser = build_parser(prog)
    ns = parser.parse_args(argv)
    base: dict[str, Any] = demo_config(seconds=ns.demo_seconds).to_dict() if ns.demo else {}
    if ns.config:
        file_data = read_config_file(ns.config)
        base.update({k: v for k, v in file_data.items() if k != "model"})
        base["model"] = {**base.get("model", {}), **(file_data.get("model") or {})}
    base.setdefault("model", {})
    for key, value in vars(ns).items():
        if key.startswith("train."):
            base[key[len("train.") :]] = value
        elif key.startswith("model."):
            base["model"][key[len("model.") :]] = value
    try:
        config = config_from_dict(base)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    return config, ns


# ================================================================================================================
# distributed helpers
# ================================================================================================================
def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _dist_on() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if _dist_on() else 1


def _barrier() -> None:
    if _dist_on():
        torch.distributed.barrier()


def _resolve_device(name: str) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def _init_distributed(device: torch.device) -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1). Returns True if this call did it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _dist_on():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    logger.info("distributed: rank %d of %d (%s)", _rank(), _world(), backend)
    return True


def _precision(config: TrainConfig, device: torch.device) -> str:
    if config.precision != "auto":
        return config.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ================================================================================================================
# data
# ================================================================================================================
def prepare_data(config: TrainConfig):
    """Read the dataset (generating the synthetic one on rank 0 when missing). Returns a ``PedesData``."""
    from .data import load_pedes, synthetic_pedes_root

    if config.dataset == "synthetic":
        root = Path(config.root) if config.root else Path(config.out_dir) / "data"
        if _rank() == 0:
            synthetic_pedes_root(
                root,
                num_ids=config.synthetic_ids,
                images_per_id=config.synthetic_images_per_id,
                captions_per_image=config.synthetic_captions_per_image,
                image_size=tuple(config.synthetic_image_size),
                seed=config.synthetic_seed,
            )
        _barrier()
    else:
        if not config.root:
            raise ValueError(
                f"dataset {config.dataset!r} needs --root (the folder holding {DATASET_NAMES[config.dataset]}/)"
            )
        root = Path(config.root)
    data = load_pedes(DATASET_NAMES[config.dataset], root)
    _check_first_images(data)
    return data


def _check_first_images(data) -> None:
    """Fail before any model is built when the first image of a split is missing (a wrong root or ``imgs/``).

    Only the first image of each split is looked at (cheap on network file systems); ``load_pedes(...,
    check_files=True)`` checks them all. A later missing image fails in the DataLoader.
    """
    firsts = [("train", data.train[0].img_path)] if data.train else []
    firsts += [
        (name, getattr(data, name)["img_paths"][0]) for name in ("val", "test") if getattr(data, name)["img_paths"]
    ]
    for split, path in firsts:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{data.name}: the first {split} image {path} does not exist; the annotation paths are read relative "
                f"to {data.root / 'imgs'} (see docs/data.md)"
            )


class _SeededRandomSampler(Sampler[int]):
    """A random permutation that is a pure function of ``(seed, epoch)``."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class GlobalBatchSampler(Sampler[list[int]]):
    """Cut an index sampler into global batches and yield this rank's contiguous slice of each.

    Every rank sees the same global batches (the index sampler is seeded identically), so DDP over N ranks takes
    exactly the steps of one process with the whole batch. Incomplete last batches are dropped.

    Args:
        sampler: index sampler with ``set_epoch`` (a pure function of the epoch).
        batch_size: global batch size (a multiple of ``world``).
        rank: this rank.
        world: number of ranks.
        max_batches: cut every epoch after this many batches.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int = 0, world: int = 1, max_batches=None):
        if batch_size % world:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of ranks ({world})")
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world
        self.max_batches = max_batches
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's batches; ``skip`` leaves out its first batches (resuming inside an epoch)."""
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        self.skip = int(skip)

    def __iter__(self) -> Iterator[list[int]]:
        flat = list(iter(self.sampler))
        per = self.batch_size // self.world
        for count, start in enumerate(range(0, len(flat) - self.batch_size + 1, self.batch_size)):
            if self.max_batches is not None and count >= self.max_batches:
                return
            if count < self.skip:
                continue
            batch = flat[start : start + self.batch_size]
            yield batch[self.rank * per : (self.rank + 1) * per]

    def __len__(self) -> int:
        """Batches of the whole epoch (``skip`` not subtracted)."""
        n = len(self.sampler) // self.batch_size  # type: ignore[arg-type]
        return n if self.max_batches is None else min(n, self.max_batches)


def build_train_loader(config: TrainConfig, data, device: torch.device) -> DataLoader:
    """The training DataLoader: this rank's slice of every global batch."""
    from .data import PedesTrainDataset, RandomIdentitySampler, build_train_transform

    mc = config.model
    dataset = PedesTrainDataset(
        data.train,
        build_train_transform(mc.image_size, augment=config.augment),
        text_length=mc.context_length,
        text_augment=config.text_augment,
    )
    if config.sampler == "identity":
        index_sampler: Sampler[int] = RandomIdentitySampler(
            dataset, config.batch_size, config.num_instances, seed=config.seed, num_replicas=1, rank=0
        )
    else:
        index_sampler = _SeededRandomSampler(len(dataset), config.seed)
    batches = GlobalBatchSampler(index_sampler, config.batch_size, _rank(), _world(), config.max_steps_per_epoch)
    if len(batches) == 0:
        raise ValueError(
            f"the training split ({len(dataset)} captions) gives no full batch of {config.batch_size}; lower batch_size"
        )
    # The loader draws its worker seed from its own generator, re-seeded every epoch (see _seed_loader), so that
    # creating an iterator never consumes the global RNG and a resumed epoch gets the workers' seeds of the original.
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator(),
    )


def _seed_loader(loader: DataLoader, config: TrainConfig, epoch: int, skip: int = 0) -> None:
    """Select the epoch's batches (leaving out the first ``skip``) and seed the loader's worker-seed generator."""
    loader.batch_sampler.set_epoch(epoch, skip)  # type: ignore[union-attr]
    if loader.generator is not None:
        loader.generator.manual_seed((config.seed * 1_000_003 + epoch) * 1_009 + _rank())


# ================================================================================================================
# optimiser and LR schedule
# ================================================================================================================
def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam(W) with the published parameter groups.

    Rules, applied in this order (later ones override the lr): every parameter gets ``lr`` and ``weight_decay``;
    names containing ``bias`` get ``lr * bias_lr_factor`` and ``bias_weight_decay``; names containing
    ``classifier`` get ``lr * classifier_lr_factor``; parameters of the banks (adapters, GPO) get ``adapter_lr``.
    Parameters with equal settings share a group (``group["name"]`` says which rule made it).

    Args:
        model: the model (an :class:`~attnselect.models.ITSELF`, or any module).
        config: the run configuration.

    Returns:
        ``torch.optim.Adam`` (or ``AdamW`` with ``optimizer="adamw"``).

    Examples:
        >>> from torch import nn
        >>> model = nn.ModuleDict({"encoder": nn.Linear(4, 4), "classifier": nn.Linear(4, 2)})
        >>> opt = build_optimizer(model, TrainConfig(lr=1e-5))
        >>> sorted((g["name"], g["lr"]) for g in opt.param_groups)
        [('base', 1e-05), ('bias', 2e-05), ('classifier_base', 5e-05), ('classifier_bias', 5e-05)]
    """
    groups: dict[tuple[str, float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr, wd, label = config.lr, config.weight_decay, "base"
        if "bias" in name:
            lr, wd, label = config.lr * config.bias_lr_factor, config.bias_weight_decay, "bias"
        if "classifier" in name:
            lr, label = config.lr * config.classifier_lr_factor, f"classifier_{label}"
        if name.startswith(("image_bank.", "text_bank.")) and config.adapter_lr is not None:
            lr, label = config.adapter_lr, f"bank_{label}"
        groups.setdefault((label, lr, wd), []).append(p)
    param_groups = [
        {"params": params, "lr": lr, "weight_decay": wd, "name": label} for (label, lr, wd), params in groups.items()
    ]
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(param_groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


def lr_factor(epoch: int, config: TrainConfig) -> float:
    """LR multiplier of epoch ``epoch`` (0-based): linear warm-up from ``warmup_factor``, then cosine to 0.

    Args:
        epoch: the epoch index, from 0.
        config: reads ``epochs``, ``warmup_epochs``, ``warmup_factor`` and ``lr_schedule``.

    Returns:
        The factor applied to every group's learning rate.

    Examples:
        >>> cfg = TrainConfig(epochs=60, warmup_epochs=5, warmup_factor=0.1)
        >>> [round(lr_factor(e, cfg), 3) for e in (0, 1, 5, 60)]
        [0.1, 0.28, 1.0, 0.0]
    """
    w = config.warmup_epochs
    if epoch < w:
        a = epoch / w
        return config.warmup_factor * (1 - a) + a
    if config.lr_schedule == "constant":
        return 1.0
    span = max(config.epochs - w, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(epoch - w, span) / span))


# ================================================================================================================
# evaluation
# ================================================================================================================
def _core(model: nn.Module) -> ITSELF:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # type: ignore[return-value]


@torch.no_grad()
def encode_split(model: ITSELF, split: dict, config: TrainConfig, device: torch.device) -> dict[str, Tensor | None]:
    """Embeddings of an evaluation split (all images and all captions), on the CPU in fp32.

    Args:
        model: the model (switched to eval mode for the call).
        split: ``PedesData.val`` / ``.test``: ``{"image_pids", "img_paths", "caption_pids", "captions"}``.
        config: reads ``eval_batch_size``, ``num_workers`` and ``precision``.
        device: where the model runs.

    Returns:
        ``{"image_global" [G,E], "image_local" [G,E_local] or None, "image_pids" [G], "text_global" [Q,E],
        "text_local", "text_pids" [Q]}``.

    Examples:
        >>> cfg = tiny_config("outputs/smoke")
        >>> data = prepare_data(cfg)  # doctest: +SKIP
        >>> model = ITSELF(cfg.model, num_classes=data.num_classes)  # doctest: +SKIP
        >>> encode_split(model, data.test, cfg, torch.device("cpu"))["image_global"].shape  # doctest: +SKIP
        torch.Size([24, 64])
    """
    from .data import ImageDataset, TextDataset, build_test_transform

    mc = model.config
    was_training = model.training
    model.eval()
    precision = _precision(config, device)
    out: dict[str, list[Tensor]] = {k: [] for k in ("ig", "il", "ip", "tg", "tl", "tp")}
    images = ImageDataset(split["image_pids"], split["img_paths"], build_test_transform(mc.image_size))
    texts = TextDataset(split["caption_pids"], split["captions"], text_length=mc.context_length)
    # An own generator keeps evaluation from consuming the global RNG (resumed runs stay identical).
    kw = dict(
        batch_size=config.eval_batch_size,
        num_workers=min(config.num_workers, 4),
        shuffle=False,
        generator=torch.Generator().manual_seed(0),
    )
    try:
        for pids, x in DataLoader(images, **kw):
            with _autocast(device, precision):
                g, loc = model.encode_image(x.to(device, non_blocking=True))
            out["ig"].append(g.float().cpu())
            if loc is not None:
                out["il"].append(loc.float().cpu())
            out["ip"].append(pids)
        for pids, ids in DataLoader(texts, **kw):
            with _autocast(device, precision):
                g, loc = model.encode_text(ids.to(device, non_blocking=True))
            out["tg"].append(g.float().cpu())
            if loc is not None:
                out["tl"].append(loc.float().cpu())
            out["tp"].append(pids)
    finally:
        model.train(was_training)

    def cat(key: str) -> Tensor | None:
        return torch.cat(out[key]) if out[key] else None

    return {
        "image_global": cat("ig"),
        "image_local": cat("il"),
        "image_pids": cat("ip"),
        "text_global": cat("tg"),
        "text_local": cat("tl"),
        "text_pids": cat("tp"),
    }


def metrics_from_features(feats: dict[str, Tensor | None], lam: float) -> dict[str, dict[str, float]]:
    """Text-to-image R@1/5/10, mAP, mINP (percent) for the global, local and fused similarities."""
    from .metrics import retrieval_metrics

    def cos(a: Tensor, b: Tensor) -> Tensor:
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()

    qp, gp = feats["text_pids"], feats["image_pids"]
    s_global = cos(feats["text_global"], feats["image_global"])
    results = {"global": retrieval_metrics(s_global, qp, gp, missing="skip")}
    if feats["text_local"] is not None and feats["image_local"] is not None:
        s_local = cos(feats["text_local"], feats["image_local"])
        results["local"] = retrieval_metrics(s_local, qp, gp, missing="skip")
        results["fused"] = retrieval_metrics(lam * s_global + (1 - lam) * s_local, qp, gp, missing="skip")
    else:
        results["fused"] = dict(results["global"])
    keep = ("R1", "R5", "R10", "mAP", "mINP", "rsum")
    return {name: {k: round(float(v), 4) for k, v in m.items() if k in keep} for name, m in results.items()}


def evaluate(model: nn.Module, split: dict, config: TrainConfig, device: torch.device) -> dict[str, dict[str, float]]:
    """Encode ``split`` and return ``{"global": {...}, "local": {...}, "fused": {...}}`` retrieval metrics.

    Args:
        model: the model (or its DDP wrapper).
        split: ``PedesData.val`` / ``.test``.
        config: the run configuration.
        device: where the model runs.

    Returns:
        Per score, text-to-image ``R1``, ``R5``, ``R10``, ``mAP``, ``mINP`` and ``rsum`` in percent.

    Examples:
        >>> cfg = tiny_config("outputs/smoke")
        >>> data = prepare_data(cfg)  # doctest: +SKIP
        >>> model = ITSELF(cfg.model, num_classes=data.num_classes)  # doctest: +SKIP
        >>> print(format_metrics_table(evaluate(model, data.test, cfg, torch.device("cpu"))))  # doctest: +SKIP
    """
    core = _core(model)
    feats = encode_split(core, split, config, device)
    return metrics_from_features(feats, core.config.lam)


def format_metrics_table(results: dict[str, dict[str, float]], title: str | None = None) -> str:
    """A plain-text table with one row per score (global / local / fused) and R@1, R@5, R@10, mAP, mINP.

    Args:
        results: ``{score name: metrics}`` as :func:`evaluate` returns them.
        title: an optional first line.

    Returns:
        The table as one string.

    Examples:
        >>> print(format_metrics_table({"fused": {"R1": 70.1, "R5": 87.0, "R10": 91.5, "mAP": 65.2, "mINP": 50.3}}))
        score        R@1     R@5    R@10     mAP    mINP
        fused      70.10   87.00   91.50   65.20   50.30
    """
    cols = ("R1", "R5", "R10", "mAP", "mINP")
    lines = [title] if title else []
    lines.append(f"{'score':<8}" + "".join(f"{c:>8}" for c in ("R@1", "R@5", "R@10", "mAP", "mINP")))
    for name in ("global", "local", "fused"):
        if name in results:
            lines.append(f"{name:<8}" + "".join(f"{results[name][c]:>8.2f}" for c in cols))
    return "\n".join(lines)


# ================================================================================================================
# checkpoints
# ================================================================================================================
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002 - the global legacy RNG is what we must restore
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["cached_gaussian"]))  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict without non-tensor extra state (the ATS step lives in ``train_state.pt``)."""
    return {k: v.detach().contiguous().cpu() for k, v in _core(model).state_dict().items() if isinstance(v, Tensor)}


def save_checkpoint(
    folder: str | os.PathLike,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    epoch: int = 0,
    global_step: int = 0,
    best: float | None = None,
    config: TrainConfig | None = None,
    rng: list[dict[str, Any]] | None = None,
    epoch_step: int = 0,
) -> Path:
    """Write ``model.safetensors``, ``train_state.pt`` and ``config.json`` into ``folder`` (atomically per file).

    ``epoch`` counts completed epochs; ``epoch_step`` is the number of steps already taken in the next, unfinished
    epoch (non-zero when a run stopped inside an epoch, e.g. on its time budget), where a resumed run continues.

    ``train_state.pt`` holds only tensors, numbers, strings, lists, tuples and dicts, so
    ``torch.load(path, weights_only=True)`` reads it.

    Returns:
        ``folder`` as a :class:`pathlib.Path`.

    Examples:
        >>> import tempfile
        >>> from attnselect.models import ITSELF
        >>> model = ITSELF(tiny_config("unused").model, num_classes=4)  # a tiny random ITSELF
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = save_checkpoint(f"{tmp}/last", model, epoch=3, global_step=120)
        ...     sorted(p.name for p in folder.iterdir())
        ['config.json', 'model.safetensors', 'train_state.pt']
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    core = _core(model)
    tmp = folder / "model.safetensors.tmp"
    save_file(model_tensors(core), str(tmp), metadata={"format": "pt", "model": "ITSELF"})
    os.replace(tmp, folder / "model.safetensors")
    state = {
        "epoch": int(epoch),
        "epoch_step": int(epoch_step),
        "global_step": int(global_step),
        "ats_step": int(core.ats.current_step) if core.ats is not None else 0,
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "lr_scheduler": scheduler.state_dict() if scheduler is not None else {},
        "scaler": scaler.state_dict() if scaler is not None else {},
        "best": float(best) if best is not None else None,
        "rng": rng or [],
        "world_size": _world(),
    }
    torch.save(state, folder / "train_state.pt.tmp")
    os.replace(folder / "train_state.pt.tmp", folder / "train_state.pt")
    cfg = config.to_dict() if config is not None else {"model": core.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return folder


def load_model_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load ``model.safetensors`` of a checkpoint folder (strict, except the non-tensor ATS extra state)."""
    from safetensors.torch import load_file

    core = _core(model)
    sd = load_file(str(Path(folder) / "model.safetensors"))
    result = core.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {folder} does not match the model: missing {missing[:8]}, unexpected "
            f"{result.unexpected_keys[:8]}"
        )


def load_checkpoint(
    folder: str | os.PathLike,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`: weights, ATS step, optimiser, LR schedule, scaler,
    and this rank's RNG state. Returns the train state (``epoch`` = completed epochs, ``epoch_step`` = steps taken in
    the unfinished next epoch, ``global_step``, ``best``).

    Examples:
        >>> import tempfile
        >>> from attnselect.models import ITSELF
        >>> model = ITSELF(tiny_config("unused").model, num_classes=4)  # a tiny random ITSELF
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = save_checkpoint(f"{tmp}/last", model, epoch=3, global_step=120)
        ...     state = load_checkpoint(folder, ITSELF(tiny_config("unused").model, num_classes=4))
        >>> state["epoch"], state["global_step"]
        (3, 120)
    """
    folder = Path(folder)
    load_model_weights(model, folder)
    state = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
    core = _core(model)
    if core.ats is not None:
        core.ats.set_extra_state({"step": int(state["ats_step"])})
    if optimizer is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("lr_scheduler"):
        scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rngs = state.get("rng") or []
    if restore_rng and rngs:
        if len(rngs) == _world():
            _set_rng_state(rngs[_rank()])
        else:
            logger.warning(
                "resume: the checkpoint holds RNG states of %d ranks but %d are running; RNG re-seeded instead",
                len(rngs),
                _world(),
            )
    return state


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any) -> ITSELF:
    """Rebuild an :class:`ITSELF` from a checkpoint folder (its ``config.json`` and ``model.safetensors``).

    Args:
        folder: a folder written by :func:`save_checkpoint`.
        device: where to put the model.
        **overrides: :class:`~attnselect.models.ITSELFConfig` fields to replace, for settings that hold no weights
            (``lam``, ``selection``, ``eval_ratio``: evaluate one checkpoint under another inference rule).

    Returns:
        The model, in eval mode, with its ATS step restored.

    Examples:
        >>> import tempfile
        >>> from attnselect.models import ITSELF
        >>> model = ITSELF(tiny_config("unused").model, num_classes=4)  # a tiny random ITSELF
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     restored = load_model(save_checkpoint(f"{tmp}/last", model))
        >>> restored.training, torch.equal(restored.clip.visual.conv1.weight, model.clip.visual.conv1.weight)
        (False, True)
    """
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_cfg = dict(cfg.get("model", cfg))
    model_cfg["pretrained"] = None
    model_cfg["gather_losses"] = False
    model_cfg.update(overrides)
    model = ITSELF(ITSELFConfig(**model_cfg))
    load_model_weights(model, folder)
    state_file = folder / "train_state.pt"
    if state_file.is_file() and model.ats is not None:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        model.ats.set_extra_state({"step": int(state["ats_step"])})
    return model.to(device).eval()


def _gather_rng() -> list[dict[str, Any]]:
    state = _rng_state()
    if not _dist_on():
        return [state]
    gathered: list[Any] = [None] * _world()
    torch.distributed.all_gather_object(gathered, state)
    return gathered


# ================================================================================================================
# training
# ================================================================================================================
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds the legacy global RNG third-party code uses
    torch.manual_seed(seed)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the train extra
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _resume_folder(config: TrainConfig) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "auto":
        folder = Path(config.out_dir) / "checkpoints" / "last"
        return folder if (folder / "train_state.pt").is_file() else None
    folder = Path(config.resume)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"resume: {folder} holds no model.safetensors")
    return folder


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) ITSELF as configured, evaluate, checkpoint. Works as one process or under torchrun.

    Args:
        config: the run configuration.

    Returns:
        ``{"val": last selection-split metrics, "test": final test metrics, "best": best fused R@1,
        "epochs": completed epochs, "steps": optimiser steps, "train_time_s": ..., "out_dir": ...}``
        (the metrics only on rank 0).

    Examples:
        >>> result = train(tiny_config("outputs/smoke"))  # doctest: +SKIP
        >>> sorted(result["test"])  # doctest: +SKIP
        ['fused', 'global', 'local']
    """
    t_start = time.time()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = _resolve_device(config.device)
    own_group = _init_distributed(device)
    try:
        return _train(config, device, t_start)
    finally:
        if own_group and _dist_on():
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, device: torch.device, t_start: float) -> dict[str, Any]:
    rank, world = _rank(), _world()
    out_dir = Path(config.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed + rank)
    data = prepare_data(config)
    if data.num_classes < 1:
        raise ValueError(f"{data.name} at {data.root} has no training identities")
    loader = build_train_loader(config, data, device)
    steps_per_epoch = len(loader)
    mc = dataclasses.replace(config.model, num_classes=data.num_classes)
    if config.ats_epochs is not None:
        mc = dataclasses.replace(mc, ats_total_steps=max(1, round(config.ats_epochs * steps_per_epoch)))
    if world > 1 and mc.gather_losses is None:
        mc = dataclasses.replace(mc, gather_losses=True)
    config = dataclasses.replace(config, model=mc)
    eval_name = config.eval_split if (config.eval_split == "test" or data.val["captions"]) else "test"
    if eval_name != config.eval_split:
        logger.warning("%s has no validation split: model selection uses the test split", data.name)
    eval_data = getattr(data, eval_name)

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = ITSELF(mc).to(device)
    seed_everything(config.seed + rank)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, config))
    precision = _precision(config, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    logger.info(
        "ITSELF: %.1fM parameters, %s, %d steps/epoch of %d (global batch), precision %s, %d rank(s)",
        sum(p.numel() for p in model.parameters()) / 1e6,
        data.summary().replace("\n", ";"),
        steps_per_epoch,
        config.batch_size,
        precision,
        world,
    )

    start_epoch, global_step, best, resume_skip = 0, 0, -1.0, 0
    folder = _resume_folder(config)
    if folder is not None:
        state = load_checkpoint(folder, model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        if not state.get("optimizer") or not state.get("lr_scheduler"):
            raise ValueError(
                f"resume: {folder} holds model weights but no optimiser / LR-schedule state (a 'best' checkpoint): "
                "resume from checkpoints/last, or start a new run from these weights"
            )
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        resume_skip = int(state.get("epoch_step", 0))
        best = state["best"] if state["best"] is not None else -1.0
        logger.info(
            "resumed from %s at epoch %d (+%d steps), step %d, ATS step %s",
            folder,
            start_epoch,
            resume_skip,
            global_step,
            model.ats.current_step if model.ats is not None else "-",
        )

    ddp = model
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    metrics_path = out_dir / "metrics.jsonl"
    last_eval: dict[str, Any] = {}
    stop = False
    epoch = start_epoch
    for epoch in range(start_epoch, config.epochs):
        skip = resume_skip if epoch == start_epoch else 0
        _seed_loader(loader, config, epoch, skip)
        epoch_len = len(loader)  # batches of this epoch (the identity sampler's count varies a little per epoch)
        model.train()
        sums: dict[str, float] = {}
        n_steps = 0
        t_epoch = time.time()
        bar = _progress(loader, epoch_len - skip, f"epoch {epoch + 1}/{config.epochs}", config.progress and rank == 0)
        for batch in bar:
            losses = train_step(ddp, batch, optimizer, scaler, config, device, precision)
            global_step += 1
            n_steps += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            if rank == 0 and config.log_every and global_step % config.log_every == 0:
                logger.info("step %d loss %.4f", global_step, losses["loss"])
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses['loss']:.3f}")
            if config.time_budget_s is not None and time.time() - t_start > config.time_budget_s:
                stop = True
                break
        # Stopped inside the epoch (time budget): the epoch stays unfinished, the LR schedule does not advance, and
        # the checkpoint records how many of its steps were taken so that a resumed run continues with the next one.
        epoch_step = skip + n_steps if skip + n_steps < epoch_len else 0
        if config.stop_after is not None and epoch + 1 >= config.stop_after:
            stop = True
        lr_now = [g["lr"] for g in optimizer.param_groups]
        if not epoch_step:
            scheduler.step()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": global_step,
            "lr": max(lr_now),
            "lr_base": optimizer.param_groups[0]["lr"] if not lr_now else lr_now[0],
            "time_s": round(time.time() - t_epoch, 2),
            **{k: v / max(n_steps, 1) for k, v in sums.items()},
        }
        if epoch_step or skip:
            record["epoch_steps"] = [skip, skip + n_steps]  # the steps of this epoch that this record covers
        if model.ats is not None:
            record["ats_step"] = model.ats.current_step
            record["k_image"] = model.last_banks["image"].k if "image" in model.last_banks else None
            record["k_text"] = model.last_banks["text"].k if "text" in model.last_banks else None
        last_epoch = epoch + 1 == config.epochs or stop
        do_eval = (config.eval_every and (epoch + 1) % config.eval_every == 0) or last_epoch
        if do_eval:
            if rank == 0:
                last_eval = evaluate(model, eval_data, config, device)
                record[eval_name] = last_eval
                logger.info("%s", format_metrics_table(last_eval, f"epoch {epoch + 1} ({eval_name})"))
            _barrier()
        rng = _gather_rng()
        if rank == 0:
            _append_jsonl(metrics_path, record)
            if do_eval and last_eval["fused"]["R1"] > best:
                best = last_eval["fused"]["R1"]
                save_checkpoint(
                    out_dir / "checkpoints" / "best",
                    model,
                    epoch=epoch + 1,
                    global_step=global_step,
                    best=best,
                    config=config,
                )
            if (config.save_every and (epoch + 1) % config.save_every == 0) or last_epoch:
                save_checkpoint(
                    out_dir / "checkpoints" / "last",
                    model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    epoch=epoch if epoch_step else epoch + 1,
                    epoch_step=epoch_step,
                    global_step=global_step,
                    best=best,
                    config=config,
                    rng=rng,
                )
        _barrier()
        if stop:
            logger.info("stopping after epoch %d (time budget or stop_after)", epoch + 1)
            break

    result: dict[str, Any] = {
        "out_dir": str(out_dir),
        "epochs": epoch + 1 if config.epochs > start_epoch else start_epoch,
        "steps": global_step,
        "train_time_s": round(time.time() - t_start, 1),
        "best": best,
        eval_name: last_eval,
    }
    if config.test_at_end and rank == 0 and data.test["captions"]:
        result["test"] = evaluate(model, data.test, config, device)
        _append_jsonl(metrics_path, {"final_test": result["test"], "step": global_step})
        logger.info("%s", format_metrics_table(result["test"], "final model (test)"))
    _barrier()
    return result


def train_step(
    model: nn.Module,
    batch: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    config: TrainConfig,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """One optimiser step: advance ATS, forward under autocast, backward (scaled for fp16), clip, step.

    Returns the step's losses as floats.
    """
    core = _core(model)
    if core.ats is not None:
        core.ats.step()  # the published counter is advanced before the forward and starts at 1
    images = batch["images"].to(device, non_blocking=True)
    ids = batch["caption_ids"].to(device, non_blocking=True)
    pids = batch["pids"].to(device, non_blocking=True)
    with _autocast(device, precision):
        losses = model(images, ids, pids)
    loss = losses["loss"]
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if config.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(core.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(core.parameters(), config.grad_clip)
        optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


# ================================================================================================================
# demo
# ================================================================================================================
def demo_config(out_dir: str | os.PathLike = "outputs/demo", seconds: float = 120.0, **overrides: Any) -> TrainConfig:
    """The CPU demo preset: a small randomly initialised ITSELF on a freshly generated synthetic set.

    Tuned for about ``seconds`` of training on 2 CPU cores; ``overrides`` replace TrainConfig fields.

    Args:
        out_dir: output folder.
        seconds: training time budget.
        **overrides: TrainConfig fields to replace.

    Returns:
        The :class:`TrainConfig`.

    Examples:
        >>> cfg = demo_config("outputs/demo", seconds=60, epochs=5)
        >>> cfg.time_budget_s, cfg.epochs, cfg.model.image_size, cfg.device
        (60, 5, (96, 32), 'cpu')
    """
    model = ITSELFConfig(
        backbone=None,
        embed_dim=128,
        vision_cfg={"layers": 4, "width": 128, "head_width": 32, "patch_size": 8, "mlp_ratio": 2.0},
        text_cfg={"vocab_size": 49408, "width": 128, "heads": 4, "layers": 4, "mlp_ratio": 2.0},
        image_size=(96, 32),
        context_length=64,
        quick_gelu=False,
        local_dim=512,
        adapter_hidden=256,
        ats_total_steps=200,
        selection="reference",
    )
    cfg = TrainConfig(
        model=model,
        dataset="synthetic",
        out_dir=str(out_dir),
        synthetic_ids=160,
        synthetic_images_per_id=4,
        synthetic_captions_per_image=2,
        synthetic_image_size=(96, 32),
        batch_size=64,
        eval_batch_size=128,
        num_workers=0,
        epochs=20,
        lr=5e-4,
        eps=1e-8,
        weight_decay=1e-4,
        classifier_lr_factor=1.0,
        adapter_lr=1e-3,
        warmup_epochs=2,
        time_budget_s=seconds,
        eval_every=0,
        save_every=0,
        precision="fp32",
        device="cpu",
        threads=2,
        log_every=0,
        seed=0,
    )
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def tiny_config(out_dir: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """A seconds-long smoke-test configuration: a 2-layer ITSELF on a small synthetic set (CPU, fp32).

    ``overrides`` replace TrainConfig fields; ``model`` may be a dict of ITSELFConfig fields to replace.

    Args:
        out_dir: output folder.
        **overrides: TrainConfig fields to replace (``model`` as a dict of ITSELFConfig fields).

    Returns:
        The :class:`TrainConfig`.

    Examples:
        >>> cfg = tiny_config("outputs/smoke", epochs=1, model={"pool": "gpo"})
        >>> cfg.epochs, cfg.model.pool, cfg.model.vision_cfg["layers"], cfg.model.image_size
        (1, 'gpo', 2, (48, 16))
    """
    model_over = overrides.pop("model", {}) or {}
    model = ITSELFConfig(
        backbone=None,
        embed_dim=64,
        vision_cfg={"layers": 2, "width": 64, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
        text_cfg={"vocab_size": 49408, "width": 64, "heads": 4, "layers": 2, "mlp_ratio": 2.0},
        image_size=(48, 16),
        context_length=64,
        quick_gelu=False,
        local_dim=128,
        adapter_hidden=64,
        ats_total_steps=20,
    )
    model = dataclasses.replace(model, **model_over)
    cfg = TrainConfig(
        model=model,
        dataset="synthetic",
        out_dir=str(out_dir),
        synthetic_ids=40,
        synthetic_images_per_id=3,
        synthetic_captions_per_image=2,
        synthetic_image_size=(48, 16),
        batch_size=32,
        eval_batch_size=128,
        num_workers=0,
        epochs=4,
        lr=1e-3,
        eps=1e-8,
        weight_decay=0.0,
        classifier_lr_factor=1.0,
        adapter_lr=1e-3,
        warmup_epochs=0,
        eval_every=0,
        test_at_end=False,
        precision="fp32",
        device="cpu",
        log_every=0,
        progress=False,
        seed=0,
    )
    return dataclasses.replace(cfg, **overrides)


def draw_kept_tokens(model: ITSELF, split: dict, path: str | os.PathLike, num_images: int = 6) -> Path:
    """Figure of the patches the image bank keeps (inference selection) on the first ``num_images`` images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import ImageDataset, build_test_transform, load_image

    mc = model.config
    n = min(num_images, len(split["img_paths"]))
    step = max(len(split["img_paths"]) // n, 1)
    chosen = list(range(0, step * n, step))[:n]
    ds = ImageDataset(split["image_pids"], split["img_paths"], build_test_transform(mc.image_size))
    x = torch.stack([ds[i][1] for i in chosen])
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        model.encode_image(x.to(device))
    out = model.last_banks["image"]
    grid = tuple(int(g) for g in model.clip.visual.grid_size)
    fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 3.6))
    axes = np.atleast_1d(axes)
    from . import viz

    for ax, i, row in zip(axes, chosen, range(n)):
        img = load_image(split["img_paths"][i]).resize((mc.image_size[1], mc.image_size[0]))
        if hasattr(viz, "plot_kept_tokens"):
            viz.plot_kept_tokens(
                img,
                out.indices,
                grid=grid,
                num_prefix_tokens=1,
                mask=out.mask,
                index=row,
                ax=ax,
                title=f"id {split['image_pids'][i]}",
            )
        else:  # pragma: no cover - fallback drawing
            arr = np.asarray(img, dtype=np.float32) / 255.0
            keep = np.zeros(grid[0] * grid[1], dtype=bool)
            keep[out.indices[row].cpu().numpy() - 1] = True
            mask = np.kron(keep.reshape(grid), np.ones((mc.image_size[0] // grid[0], mc.image_size[1] // grid[1])))
            ax.imshow(arr * (0.3 + 0.7 * mask[..., None]))
            ax.set_title(f"id {split['image_pids'][i]}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"kept {out.k} of {grid[0] * grid[1]} patches", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def demo(
    out_dir: str | os.PathLike = "outputs/demo",
    seconds: float = 120.0,
    *,
    config: TrainConfig | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a small ITSELF on fresh synthetic data for about ``seconds`` on the CPU, evaluate it on the test split,
    and draw the kept tokens of some test images (``<out_dir>/kept_tokens.png``).

    Args:
        out_dir: output folder (data, checkpoints, metrics log, figure).
        seconds: training time budget.
        config: a complete configuration to use instead of :func:`demo_config` (``out_dir``/``seconds`` ignored).
        **overrides: TrainConfig fields replacing the preset's.

    Returns:
        The :func:`train` result plus ``"table"`` (the test metrics as text), ``"figure"`` and ``"chance_R1"``.

    Examples:
        >>> result = demo("outputs/demo", seconds=60)  # doctest: +SKIP
        >>> print(result["table"])  # doctest: +SKIP
    """
    if config is None:
        config = demo_config(out_dir, seconds, **overrides)
    result = train(config)
    from .data import load_pedes

    data = load_pedes("CUHK-PEDES", Path(config.root) if config.root else Path(config.out_dir) / "data")
    test = data.test
    # R@1 of a random ranking: mean share of positives in the gallery
    pids = np.asarray(test["image_pids"])
    result["chance_R1"] = float(np.mean([np.mean(pids == p) for p in test["caption_pids"]]) * 100)
    model = load_model(Path(config.out_dir) / "checkpoints" / "last")
    result["figure"] = str(draw_kept_tokens(model, test, Path(config.out_dir) / "kept_tokens.png"))
    result["table"] = format_metrics_table(result["test"], "ITSELF demo, test split (text-to-image, %)")
    return result


# ================================================================================================================
# entry points
# ================================================================================================================
def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        level = logging.INFO if _env_rank() == 0 else logging.WARNING
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _emit(text: str) -> None:
    """Command output for the user (entry points only; the library itself logs)."""
    if _env_rank() == 0:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def main(argv: Sequence[str] | None = None, *, prog: str = "train_itself") -> int:
    """Command-line entry: train (default), ``--eval-only`` or ``--demo``. Returns the exit status.

    Args:
        argv: the flags (see :func:`parse_args`); default ``sys.argv[1:]``.
        prog: program name for the help text.

    Examples:
        >>> main(["--dataset", "rstp", "--root", "data", "--out", "outputs/rstp"])  # doctest: +SKIP
        0
    """
    _setup_logging()
    config, ns = parse_args(argv, prog=prog)
    if ns.eval_only:
        return _eval(config, explicit=[k[len("model.") :] for k in vars(ns) if k.startswith("model.")])
    if ns.demo:
        result = demo(config=config)
        _emit(result["table"])
        _emit(
            f"chance R@1 = {result['chance_R1']:.2f} %, trained {result['epochs']} epochs / {result['steps']} steps "
            f"in {result['train_time_s']:.0f} s"
        )
        _emit(f"kept-token figure: {result['figure']}")
        _emit(f"metrics log: {Path(config.out_dir) / 'metrics.jsonl'}")
        return 0
    result = train(config)
    if "test" in result:
        _emit(format_metrics_table(result["test"], "final model, test split (text-to-image, %)"))
    return 0


_INFERENCE_FIELDS = ("lam", "selection", "eval_ratio")  # ITSELFConfig fields that hold no weights


def _eval(config: TrainConfig, explicit: Sequence[str] = ()) -> int:
    """Evaluate a checkpoint (``--resume``) or pretrained weights; ``explicit`` names the model flags given on the
    command line, of which the inference settings replace the checkpoint's."""
    device = _resolve_device(config.device)
    folder = _resume_folder(config)
    if folder is None and config.resume == "auto":
        raise FileNotFoundError(
            f"--resume auto: no checkpoint at {Path(config.out_dir) / 'checkpoints' / 'last'} (set --out to the run's "
            "folder, or give --resume CHECKPOINT_DIR)"
        )
    if folder is not None:
        overrides = {f: getattr(config.model, f) for f in _INFERENCE_FIELDS if f in explicit}
        model = load_model(folder, device, **overrides)
        if config.dataset == "synthetic":  # evaluate on the data it was trained on, never regenerate other data
            saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            keys = [k for k in saved if k.startswith("synthetic_") or k in ("root", "out_dir")]
            config = dataclasses.replace(config, **{k: saved[k] for k in keys if not (k == "root" and config.root)})
    elif config.model.pretrained:
        data = prepare_data(config)
        model = ITSELF(dataclasses.replace(config.model, num_classes=max(data.num_classes, 1))).to(device).eval()
    else:
        raise ValueError("--eval-only needs --resume CHECKPOINT_DIR or --pretrained FILE")
    data = prepare_data(config)
    for split in ("val", "test"):
        d = getattr(data, split)
        if d["captions"]:
            _emit(format_metrics_table(evaluate(model, d, config, device), f"{data.name} {split} (text-to-image, %)"))
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    """``attnselect train ...``: :func:`main` under the ``attnselect`` command.

    Examples:
        >>> train_main(["--dataset", "cuhk", "--root", "data", "--epochs", "60"])  # doctest: +SKIP
        0
    """
    return main(argv, prog="attnselect train")


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``attnselect eval --resume CHECKPOINT_DIR ...``: :func:`main` with ``--eval-only``.

    Examples:
        >>> eval_main(["--resume", "outputs/itself/checkpoints/last", "--dataset", "cuhk"])  # doctest: +SKIP
        0
    """
    return main(["--eval-only", *(argv or [])], prog="attnselect eval")


def demo_main(argv: Sequence[str] | None = None) -> int:
    """``attnselect demo [--out DIR] [--demo-seconds S]``: :func:`main` with ``--demo``.

    Examples:
        >>> demo_main(["--out", "outputs/demo", "--demo-seconds", "60"])  # doctest: +SKIP
        0
    """
    return main(["--demo", *(argv or [])], prog="attnselect demo")
