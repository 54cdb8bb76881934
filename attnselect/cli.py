"""The ``attnselect`` command.

Sub-commands::

    attnselect demo      train and evaluate a tiny ITSELF model on synthetic data (seconds, offline)
    attnselect train     train the reference ITSELF model (arguments of the training engine)
    attnselect eval      evaluate a checkpoint (arguments of the training engine)
    attnselect bench     run the benchmark scripts, append to a CSV and draw the plots
    attnselect inspect   per-layer saliency, rollout and kept tokens of a local model on one image, as one figure
    attnselect env       versions, device, and whether the Triton kernels are used (and why)

Errors print one line on stderr and exit with status 1 (2 for bad arguments); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BENCHMARKS", "LoadedModel", "build_parser", "load_model", "main"]

logger = logging.getLogger(__name__)

#: benchmark scripts run by ``attnselect bench`` (``benchmarks/bench_<name>.py``), in this order
BENCHMARKS = ("rollout", "topk_gather", "capture", "attach")

_DISTRIBUTIONS = (
    ("python", None),
    ("attnselect", "attnselect"),
    ("torch", "torch"),
    ("triton", "triton"),
    ("transformers", "transformers"),
    ("open_clip", "open_clip_torch"),
    ("timm", "timm"),
    ("numpy", "numpy"),
    ("matplotlib", "matplotlib"),
)


_FORWARDED = ("demo", "train", "eval")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# --------------------------------------------------------------------------------------------------------------------
# env
# --------------------------------------------------------------------------------------------------------------------
def _version(dist: str | None) -> str:
    if dist is None:
        return platform.python_version()
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    """Versions, device and kernel status as ``{name: value}`` (what ``attnselect env`` prints)."""
    info = {name: _version(dist) for name, dist in _DISTRIBUTIONS}
    info["platform"] = platform.platform()
    import torch

    info["torch"] = torch.__version__  # with the build tag (+cu130, +cpu), which the distribution version lacks
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        info["device"] = f"cuda:{idx} {torch.cuda.get_device_name(idx)} (sm_{cap[0]}{cap[1]})"
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device"] = "cpu (no CUDA device visible)"
    info["ATTNSELECT_KERNELS"] = os.environ.get("ATTNSELECT_KERNELS", "(unset)")
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "(unset)")
    try:
        kernels = importlib.import_module("attnselect.kernels")
    except ImportError as exc:  # pragma: no cover - the package ships kernels/
        info["kernels"] = f"unavailable ({exc})"
        return info
    explain = getattr(kernels, "explain", None)
    if callable(explain):
        info["kernels"] = str(explain())
    else:
        info["kernels"] = "this build of attnselect.kernels has no explain()"
    return info


def _cmd_env(args: argparse.Namespace) -> int:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        lines = str(value).splitlines() or [""]
        print(f"{key:<{width}}  {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<{width}}  {line}")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# inspect: build a local model
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A vision tower ready for :func:`attnselect.capture_attention`.

    Attributes:
        model: the module to call on pixels (eval mode).
        family: ``"open_clip"``, ``"timm"`` or ``"hf"``.
        image_size: ``(height, width)`` the model expects.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        num_layers: transformer depth.
        num_prefix_tokens: tokens before the patches (CLS + registers; 0 without CLS).
        has_cls: whether position 0 is a class token (the rollout's query row).
        call: ``(model, pixels) -> output``, how to run the tower on a pixel batch.
    """

    model: Any
    family: str
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_layers: int
    num_prefix_tokens: int
    has_cls: bool
    call: Callable[[Any, Any], Any]


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_model_args(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--model-arg expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _pair(x: Any) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    a, b = tuple(x)[-2:]
    return (int(a), int(b))


def _load_open_clip(name: str, weights: str | None, kwargs: dict[str, Any]) -> LoadedModel:
    try:
        import open_clip
    except ImportError as exc:
        raise CLIError("open_clip is not installed: pip install open_clip_torch") from exc
    from .hooks.open_clip import hub_download_reason

    if name.endswith(".json") or os.path.isfile(name):
        with open(name) as f:
            cfg = json.load(f)
        cfg.update(kwargs)
        why = hub_download_reason(cfg)
        if why:
            raise CLIError(f"{name}: {why}; attnselect never downloads: use a config whose towers build locally")
        model = open_clip.CLIP(**cfg)
        if weights:
            _load_state_dict(model, weights)
    else:
        if name not in open_clip.list_models():
            raise CLIError(f"unknown open_clip model {name!r}; see open_clip.list_models() or pass a config .json")
        why = hub_download_reason(open_clip.get_model_config(name))
        if why:
            raise CLIError(
                f"open_clip:{name}: {why}; attnselect never downloads. Pick a model whose towers open_clip builds "
                "from its bundled config (e.g. open_clip:ViT-B-16), or pass a config .json"
            )
        if weights and not os.path.isfile(weights):
            raise CLIError(f"--weights: no such file {weights!r} (only local weights are loaded)")
        model = open_clip.create_model(name, pretrained=weights or None, **kwargs)
    visual = model.visual
    if hasattr(visual, "trunk"):  # a timm trunk (EVA02, PE-Core)
        n_layers = len(visual.trunk.blocks)
        has_cls = getattr(visual.trunk, "cls_token", None) is not None
        prefix = int(visual.trunk.num_prefix_tokens)
        image_size = _pair(getattr(visual, "image_size", None) or visual.trunk.patch_embed.img_size)
    else:
        n_layers = len(visual.transformer.resblocks)
        has_cls = getattr(visual, "class_embedding", None) is not None
        prefix = 1 if has_cls else 0
        image_size = _pair(visual.image_size)
    mean = tuple(getattr(visual, "image_mean", None) or _CLIP_MEAN)
    std = tuple(getattr(visual, "image_std", None) or _CLIP_STD)
    return LoadedModel(
        model=model,
        family="open_clip",
        image_size=image_size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        num_layers=n_layers,
        num_prefix_tokens=prefix,
        has_cls=has_cls,
        call=lambda m, x: m.encode_image(x),
    )


def _load_state_dict(model: Any, path: str) -> None:
    import torch

    if not os.path.isfile(path):
        raise CLIError(f"--weights: no such file {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        logger.warning("weights %s: %d missing and %d unexpected keys", path, len(missing), len(unexpected))


def _load_timm(name: str, weights: str | None, kwargs: dict[str, Any]) -> LoadedModel:
    try:
        import timm
    except ImportError as exc:
        raise CLIError("timm is not installed: pip install timm") from exc
    if not timm.is_model(name):
        raise CLIError(f"unknown timm model {name!r}; see timm.list_models()")
    if weights:
        if not os.path.isfile(weights):
            raise CLIError(f"--weights: no such file {weights!r}")
        kwargs = {**kwargs, "checkpoint_path": weights}
    model = timm.create_model(name, pretrained=False, **kwargs)
    if not hasattr(model, "blocks") or not hasattr(model, "num_prefix_tokens"):
        raise CLIError(f"timm model {name!r} ({type(model).__name__}) is not a ViT with blocks and prefix tokens")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    img = getattr(model.patch_embed, "img_size", None) or cfg.get("input_size", (3, 224, 224))[-2:]
    return LoadedModel(
        model=model,
        family="timm",
        image_size=_pair(img),
        mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
        std=tuple(cfg.get("std", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
        num_layers=len(model.blocks),
        num_prefix_tokens=int(model.num_prefix_tokens),
        has_cls=getattr(model, "cls_token", None) is not None,
        call=lambda m, x: m.forward_features(x),
    )


def _load_hf(path: str, weights: str | None, kwargs: dict[str, Any]) -> LoadedModel:
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as exc:
        raise CLIError("transformers is not installed: pip install transformers") from exc
    p = Path(path)
    if not p.exists():
        raise CLIError(f"hf: no such file or directory {path!r} (give a local config.json or a model folder)")
    config = AutoConfig.from_pretrained(str(p), local_files_only=True, **kwargs)
    folder = p if p.is_dir() else p.parent
    has_weights = any((folder / f).exists() for f in ("model.safetensors", "pytorch_model.bin")) or any(
        folder.glob("model-*.safetensors")
    )
    if p.is_dir() and has_weights:
        model = AutoModel.from_pretrained(str(p), local_files_only=True, **kwargs)
    else:
        model = AutoModel.from_config(config)
    if weights:
        _load_state_dict(model, weights)
    tower = getattr(model, "vision_model", model)
    vcfg = getattr(config, "vision_config", config)
    if not hasattr(vcfg, "image_size") or not hasattr(vcfg, "num_hidden_layers"):
        raise CLIError(f"hf: {type(config).__name__} is not a vision transformer config (no image_size)")
    model_type = str(getattr(vcfg, "model_type", ""))
    has_cls = "siglip" not in model_type
    n_reg = int(getattr(vcfg, "num_register_tokens", 0) or 0)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if "clip" in model_type:
        mean, std = _CLIP_MEAN, _CLIP_STD
    proc = folder / "preprocessor_config.json"
    if proc.exists():
        pc = json.loads(proc.read_text())
        mean = tuple(pc.get("image_mean", mean))  # type: ignore[assignment]
        std = tuple(pc.get("image_std", std))  # type: ignore[assignment]
    return LoadedModel(
        model=tower,
        family="hf",
        image_size=_pair(vcfg.image_size),
        mean=mean,
        std=std,
        num_layers=int(vcfg.num_hidden_layers),
        num_prefix_tokens=(1 + n_reg) if has_cls else 0,
        has_cls=has_cls,
        call=lambda m, x: m(pixel_values=x),
    )


def load_model(spec: str, *, weights: str | None = None, model_args: dict[str, Any] | None = None) -> LoadedModel:
    """Build a vision tower from a local spec, never downloading anything.

    ``spec`` is ``open_clip:NAME`` (architecture from open_clip's bundled configs, random init unless ``weights``)
    or ``open_clip:/path/config.json``; ``timm:NAME`` (``pretrained=False``; ``weights`` is a local checkpoint);
    ``hf:/path`` (a ``config.json`` or a folder with a config and optional weights).
    """
    family, sep, name = spec.partition(":")
    if not sep or not name:
        raise CLIError(f"MODEL_SPEC must look like open_clip:NAME, timm:NAME or hf:/path, got {spec!r}")
    kwargs = dict(model_args or {})
    loaders = {"open_clip": _load_open_clip, "timm": _load_timm, "hf": _load_hf}
    if family not in loaders:
        raise CLIError(f"MODEL_SPEC family must be one of {sorted(loaders)}, got {family!r}")
    try:
        loaded = loaders[family](name, weights, kwargs)
    except CLIError:
        raise
    except (TypeError, ValueError, OSError, RuntimeError, KeyError) as exc:
        raise CLIError(f"could not build {spec!r}: {exc}") from exc
    loaded.model.eval()
    return loaded


def _load_image(path: str, loaded: LoadedModel) -> tuple[Any, Any]:
    """``(display [H,W,3] in [0,1], pixels [1,3,H,W] normalised)`` at the model's input size."""
    import numpy as np
    import torch

    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover
        raise CLIError("pillow is needed to read images: pip install pillow") from exc
    if not os.path.isfile(path):
        raise CLIError(f"IMAGE: no such file {path!r}")
    try:
        img = Image.open(path).convert("RGB")
    except OSError as exc:
        raise CLIError(f"IMAGE: cannot read {path!r}: {exc}") from exc
    height, width = loaded.image_size
    img = img.resize((width, height), Image.BICUBIC)
    display = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(display).permute(2, 0, 1).unsqueeze(0)
    mean = torch.tensor(loaded.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std, dtype=torch.float32).view(1, 3, 1, 1)
    return display, (x - mean) / std


def _parse_layers(text: str | None) -> list[int | str] | None:
    if text is None:
        return None
    out: list[int | str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        out.append(int(item) if item.lstrip("-").isdigit() else item)
    if not out:
        raise CLIError(f"--layers must list layer indices or names, got {text!r}")
    return out


def inspect_model(
    loaded: LoadedModel,
    image_path: str,
    *,
    rollout_layers: Sequence[int | str] = ("middle", "late"),
    show_layers: Sequence[int | str] | None = None,
    discard_ratio: float = 0.25,
    ratio: float = 0.4,
    out: str | Path = "inspect.png",
    title: str | None = None,
) -> dict[str, Any]:
    """Capture every needed layer in one forward, roll out, select and draw one figure; return a summary."""
    import torch

    from . import functional as F
    from .hooks import capture_attention
    from .rollout import MultiLayerRollout, resolve_layers
    from .viz import infer_grid, plot_inspection, query_row_saliency

    display, pixels = _load_image(image_path, loaded)
    capture = capture_attention(loaded.model, "all", head_fusion="mean")
    try:
        with torch.no_grad():
            loaded.call(loaded.model, pixels)
        maps = {layer: m.float() for layer, m in capture.maps.items()}
        num_layers = capture.num_layers
        prefix = capture.num_prefix_tokens
        cls_index = capture.cls_index
        grid = capture.grid
    finally:
        capture.remove()
    if not maps:
        raise CLIError("the forward pass produced no attention maps; is this a vision tower?")
    try:
        chosen = resolve_layers(list(rollout_layers), num_layers)
        shown = resolve_layers(list(show_layers), num_layers) if show_layers else tuple(range(num_layers))
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--layers/--show-layers: {exc}") from exc
    n_tokens = maps[chosen[0]].shape[-1]
    if grid is None or grid[0] * grid[1] != n_tokens - prefix:
        grid = infer_grid(n_tokens - prefix, image_size=loaded.image_size)
    mars = MultiLayerRollout(layers=list(chosen), discard_ratio=discard_ratio)
    if cls_index is not None:
        query: Any = cls_index
        saliency = mars({i: maps[i] for i in chosen}, query=cls_index)
        per_layer = {i: query_row_saliency(maps[i], cls_index) for i in shown}
    else:
        # No class token (SigLIP): a token's saliency is the attention it receives, averaged over all queries.
        query = None
        saliency = mars({i: maps[i] for i in chosen}).mean(dim=1)
        per_layer = {i: maps[i].mean(dim=1) for i in shown}
    valid = torch.ones_like(saliency, dtype=torch.bool)
    valid[:, :prefix] = False
    n_select = n_tokens - prefix
    k = min(max(int(n_select * ratio), 1), n_select)
    indices, mask = F.select_topk(saliency, k, valid=valid)
    fig = plot_inspection(
        display,
        per_layer,
        saliency,
        indices,
        grid=grid,
        num_prefix_tokens=prefix,
        mask=mask,
        rollout_layers=chosen,
        suptitle=title,
        save=out,
    )
    fig.clear()
    return {
        "out": str(out),
        "family": loaded.family,
        "tokens": n_tokens,
        "num_prefix_tokens": prefix,
        "grid": grid,
        "rollout_layers": list(chosen),
        "shown_layers": list(shown),
        "query": query,
        "k": k,
    }


def _cmd_inspect(args: argparse.Namespace) -> int:
    loaded = load_model(args.model_spec, weights=args.weights, model_args=_parse_model_args(args.model_arg))
    if not 0.0 < args.ratio <= 1.0:
        raise CLIError(f"--ratio must lie in (0, 1], got {args.ratio}")
    if not 0.0 <= args.discard_ratio <= 1.0:
        raise CLIError(f"--discard-ratio must lie in [0, 1], got {args.discard_ratio}")
    summary = inspect_model(
        loaded,
        args.image,
        rollout_layers=_parse_layers(args.layers) or ("middle", "late"),
        show_layers=_parse_layers(args.show_layers),
        discard_ratio=args.discard_ratio,
        ratio=args.ratio,
        out=args.out,
        title=args.title or f"{args.model_spec}  {Path(args.image).name}",
    )
    grid = summary["grid"]
    print(
        f"wrote {summary['out']}: {summary['family']} model, {summary['tokens']} tokens "
        f"({summary['num_prefix_tokens']} prefix + {grid[0]}x{grid[1]} patches), rollout over layers "
        f"{summary['rollout_layers']}, kept {summary['k']} patches"
    )
    return 0


# --------------------------------------------------------------------------------------------------------------------
# demo / train / eval: the training engine
# --------------------------------------------------------------------------------------------------------------------
def _train_module() -> Any:
    try:
        return importlib.import_module("attnselect.train")
    except ModuleNotFoundError as exc:
        if exc.name == "attnselect.train":
            raise CLIError("the training engine (attnselect.train) is not part of this installation") from exc
        raise CLIError(f"the training engine needs a missing package: {exc.name}") from exc


def _cmd_forward(args: argparse.Namespace) -> int:
    """``train`` / ``eval`` / ``demo``: hand the remaining arguments to the training engine."""
    train = _train_module()
    entry = getattr(train, f"{args.command}_main", None) or getattr(train, "main", None)
    if entry is None:
        raise CLIError(f"attnselect.train has no entry point for {args.command!r}")
    rest = list(args.rest)
    if entry is getattr(train, "main", None) and getattr(train, f"{args.command}_main", None) is None:
        rest = [args.command, *rest]
    result = entry(rest)
    return int(result) if isinstance(result, int) else 0


# --------------------------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------------------------
def _find_benchmarks(directory: str | None) -> Path:
    candidates = (
        [Path(directory)] if directory else [Path.cwd() / "benchmarks", Path(__file__).parents[1] / "benchmarks"]
    )
    for c in candidates:
        if (c / "harness.py").exists() or any(c.glob("bench_*.py")):
            return c
    where = ", ".join(str(c) for c in candidates)
    raise CLIError(f"no benchmark scripts found (looked in {where}); run from a source checkout or pass --dir")


def _accepts(script: Path, flag: str) -> bool:
    """Whether a benchmark script declares ``flag``, itself or through the shared harness it imports."""
    source = script.read_text()
    harness = script.parent / "harness.py"
    if "harness" in source and harness.exists():
        source += harness.read_text()
    return f'"{flag}"' in source or f"'{flag}'" in source


def _cmd_bench(args: argparse.Namespace) -> int:
    folder = _find_benchmarks(args.dir)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    scripts = []
    for name in names:
        script = folder / f"bench_{name}.py"
        if not script.exists():
            available = sorted(p.stem[len("bench_") :] for p in folder.glob("bench_*.py"))
            raise CLIError(f"no benchmark {name!r} in {folder} (available: {', '.join(available) or 'none'})")
        scripts.append(script)
    flags = [("--quick", None)] if args.quick else []
    if args.csv:
        flags.append(("--csv", args.csv))
    if args.plot_dir:
        flags.append(("--plot-dir", args.plot_dir))
    lacking = [f"{script.name} ({flag})" for script in scripts for flag, _ in flags if not _accepts(script, flag)]
    if lacking:
        raise CLIError("these benchmark scripts do not take the requested option: " + ", ".join(lacking))
    failed = []
    for script in scripts:
        cmd = [sys.executable, str(script)]
        for flag, value in flags:
            cmd += [flag] if value is None else [flag, value]
        cmd += list(args.rest)
        print("$ " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=folder.parent)
        if rc != 0:
            failed.append(f"{script.name} (exit {rc})")
    if failed:
        raise CLIError("benchmark(s) failed: " + ", ".join(failed))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------------------------------
def _version_string() -> str:
    from ._version import __version__

    return f"attnselect {__version__}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``attnselect`` command."""
    parser = argparse.ArgumentParser(
        prog="attnselect",
        description="Attention-guided token selection for ViTs and CLIP-style dual encoders.",
        epilog="Run 'attnselect COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=_version_string())
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    forward_help = {
        "demo": "train and evaluate a tiny ITSELF model on synthetic data (offline, about two minutes on CPU)",
        "train": "train the reference ITSELF model",
        "eval": "evaluate an ITSELF checkpoint",
    }
    for name, text in forward_help.items():
        p = sub.add_parser(
            name,
            help=text,
            description=f"{text[0].upper()}{text[1:]}. Every argument after '{name}' goes to the training engine, "
            f"whose own help 'attnselect {name} --help' prints.",
            add_help=False,
        )
        p.set_defaults(func=_cmd_forward, rest=[])

    p = sub.add_parser(
        "bench",
        help="run the benchmark scripts, append results to a CSV and draw plots",
        description="Run benchmarks/bench_*.py (from a source checkout). Results are appended to a CSV with the "
        "machine, versions and commit, and the plots are redrawn from it.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--csv", help="CSV file to append to (default: the scripts' own)")
    p.add_argument("--plot-dir", help="folder for the plots (default: the scripts' own)")
    p.add_argument("--dir", help="folder holding the bench_*.py scripts (default: ./benchmarks)")
    p.set_defaults(func=_cmd_bench, rest=[])

    p = sub.add_parser(
        "inspect",
        help="draw per-layer saliency, rollout and kept tokens of a local model on an image",
        description="Build a vision transformer from a LOCAL spec (nothing is downloaded), capture its attention in "
        "one forward pass and write one figure: the CLS attention of each layer, the rollout over the chosen layers "
        "and the kept patches over the image.",
        epilog="MODEL_SPEC examples: open_clip:ViT-B-16 (random init; --weights PATH for local weights), "
        "open_clip:/path/model_cfg.json, timm:vit_small_patch16_224 (pretrained=False; --weights PATH), "
        "hf:/path/to/model-folder or hf:/path/config.json.",
    )
    p.add_argument("model_spec", metavar="MODEL_SPEC", help="open_clip:NAME | timm:NAME | hf:PATH")
    p.add_argument("image", metavar="IMAGE", help="image file (resized to the model's input size)")
    p.add_argument("--weights", help="local checkpoint (.pt, .bin or .safetensors) to load")
    p.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="keyword argument for the model constructor (repeatable), e.g. depth=4 or img_size=(384,128)",
    )
    p.add_argument(
        "--layers",
        default="middle,late",
        help="rollout layers: indices and/or early,middle,late (default: %(default)s)",
    )
    p.add_argument("--show-layers", help="layers drawn one by one (default: all)")
    p.add_argument(
        "--discard-ratio", type=float, default=0.25, help="share of entries zeroed per layer (default: %(default)s)"
    )
    p.add_argument("--ratio", type=float, default=0.4, help="share of patches kept (default: %(default)s)")
    p.add_argument("--out", default="inspect.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--title", help="figure title")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "env",
        help="print versions, the device and whether the Triton kernels are used",
        description="Print the versions of python, torch, triton, transformers, open_clip and timm, the device, "
        "and whether the Triton kernels are enabled and why.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_env)
    return parser


def _one_line(exc: BaseException) -> str:
    """The first line of an error message; for an error re-raised from a DataLoader worker (whose first line is
    torch's "Caught X in DataLoader worker process N."), the worker's own last line, which names e.g. the file."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines[0].startswith("Caught ") and "Original Traceback" in text and len(lines) > 1:
        where = lines[0].split(" in ", 1)[-1].rstrip(".")
        return f"{lines[-1]} (in {where})"
    return lines[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnselect`` command; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after demo/train/eval belongs to the training engine (its --help included), so only the part up
    # to the command is parsed here; bench passes the options it does not know to every script.
    pos = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if pos < len(argv) and argv[pos] in _FORWARDED:
        args = parser.parse_args(argv[: pos + 1])
        args.rest = argv[pos + 1 :]
    elif pos < len(argv) and argv[pos] == "bench":
        args, unknown = parser.parse_known_args(argv)
        args.rest = unknown[1:] if unknown[:1] == ["--"] else unknown
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("attnselect: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        message = _one_line(exc)
        named = isinstance(exc, CLIError) or message.startswith(f"{type(exc).__name__}:")
        kind = "" if named else f"{type(exc).__name__}: "
        print(
            f"attnselect {args.command}: error: {kind}{message} (run with --debug for the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
