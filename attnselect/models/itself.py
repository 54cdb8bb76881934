"""Reference ITSELF model (arXiv 2601.01024) assembled from the library's public parts.

ITSELF = a CLIP dual encoder fine-tuned end to end, with a *global* branch (projected image CLS / text EOS token) and
a *local* branch (GRAB): per tower an :class:`~attnselect.AttentiveBank` scores every token by a multi-layer attention
rollout (MARS), keeps the top-k tokens (k annealed by the :class:`~attnselect.AdaptiveTokenScheduler`, ATS), adapts
them with a :class:`~attnselect.TokenAdapter` and pools them into a local embedding. Both embedding pairs are trained
with TAL and CID/ID losses; retrieval fuses the two cosine similarity matrices.

The backbone is an unmodified open_clip ``CLIP``: attention maps and the projected token sequences come from the
library's capture hooks (:func:`attnselect.hooks.capture_attention`), so the host keeps its fused attention and one
backbone pass yields both embeddings. Paper-to-code map and the published quirks: ``docs/itself.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bank import AttentiveBank, BankOutput, TokenAdapter
from ..rollout import MultiLayerRollout, resolve_layers
from ..scheduler import AdaptiveTokenScheduler

__all__ = [
    "ITSELF",
    "ITSELFConfig",
    "build_clip",
    "interpolate_pos_embed",
    "load_clip_weights",
    "read_state_dict",
]

logger = logging.getLogger(__name__)

SELECTIONS = ("reference", "consistent")
LOSSES = ("tal", "cid", "id", "sdm")


@dataclass
class ITSELFConfig:
    """Everything that defines an :class:`ITSELF` model. Defaults reproduce the published CLIP ViT-B/16 setting.

    Examples:
        >>> cfg = ITSELFConfig(num_classes=3701, selection="consistent")
        >>> cfg.layers, cfg.image_size, cfg.to_dict()["losses"]
        (('middle', 'late'), (384, 128), ['tal', 'cid', 'id'])
    """

    # --- backbone (open_clip CLIP) ---
    backbone: str | None = "ViT-B-16"  # open_clip model config name; None: build only from vision_cfg / text_cfg
    embed_dim: int | None = None  # joint width E (None: from the named config, 512 for ViT-B/16)
    vision_cfg: dict[str, Any] = field(default_factory=dict)  # overrides of open_clip CLIPVisionCfg fields
    text_cfg: dict[str, Any] = field(default_factory=dict)  # overrides of open_clip CLIPTextCfg fields
    image_size: tuple[int, int] = (384, 128)  # input (H, W); the pretrained grid is interpolated to it
    context_length: int = 77  # text positions (SOS + words + EOS + padding)
    quick_gelu: bool = True  # QuickGELU MLPs as in the OpenAI CLIP weights
    pretrained: str | None = None  # LOCAL weights file (state dict, open_clip checkpoint, safetensors); never downloads
    # --- identities ---
    num_classes: int = 11003  # training identities C (CUHK-PEDES 11003, ICFG-PEDES 3102, RSTPReid 3701)
    # --- local branch (GRAB) ---
    use_local: bool = True  # False: the paper's global-only "Baseline"
    selection: str = "reference"  # "reference": MARS + ATS in training, last layer + eval_ratio at inference;
    #                               "consistent": MARS at both, the final ATS k at inference
    layers: tuple[int | str, ...] = ("middle", "late")  # MARS layers (names resolve to L//3 and L-1: 4 and 11)
    discard_ratio: float = 0.25  # share of lowest entries zeroed per MARS layer
    head_fusion: str = "mean"  # head fusion of the captured maps
    protect: str = "entry0"  # "entry0" keeps map entry (0, 0) from the discard, as published; "none"
    rho_start: float = 0.65  # ATS kept share at the start
    rho_end: float = 0.5  # ATS kept share at the end
    ats_total_steps: int = 1450  # ATS length T in steps (published: hard-coded 1450 = 10 RSTPReid epochs)
    ats_schedule: str = "exp"  # ATS curve: exp (Eq. 4), linear, cosine, fixed
    eval_ratio: float = 0.4  # kept share at inference with selection="reference" (76 of 192, 30 of 75)
    local_dim: int = 4096  # local embedding width E_local
    adapter_hidden: int = 2048  # hidden width of the adapter MLP
    adapter_norm: str = "batch"  # adapter MLP norm: "batch" (statistics over valid tokens only), "layer", "none"
    pool: str = "max"  # pooling of the kept tokens: "max" (published code) or "gpo" (paper text)
    # --- losses ---
    losses: tuple[str, ...] = ("tal", "cid", "id")  # summed on the global and the local pair; also "sdm"
    tau: float = 0.015  # TAL temperature
    margin: float = 0.1  # TAL margin
    cid_negative_label: str = "extra"  # CID mismatch class: "extra" (class C) or "batch_max" (published quirk)
    gather_losses: bool | None = None  # gather features over DDP ranks in the losses (None: when distributed)
    # --- retrieval ---
    lam: float = 0.68  # fusion weight of the global similarity: lam * S_global + (1 - lam) * S_local

    def __post_init__(self) -> None:
        self.image_size = _pair(self.image_size, "image_size")
        self.layers = tuple(self.layers) if not isinstance(self.layers, (int, str)) else (self.layers,)
        self.losses = tuple(self.losses) if not isinstance(self.losses, str) else tuple(self.losses.split("+"))
        self.vision_cfg = dict(self.vision_cfg or {})
        self.text_cfg = dict(self.text_cfg or {})
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        unknown = [name for name in self.losses if name not in LOSSES]
        if unknown or not self.losses:
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {self.losses!r}")
        if "id" in self.losses and "cid" not in self.losses:
            raise ValueError("losses: 'id' uses the CID identity classifier and needs 'cid' as well")
        if self.pool not in ("max", "gpo"):
            raise ValueError(f"pool must be 'max' or 'gpo', got {self.pool!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {self.lam}")
        if not self.tau > 0:
            raise ValueError(f"tau (TAL temperature) must be > 0, got {self.tau}")
        if self.context_length < 3:
            raise ValueError(f"context_length must be >= 3 (SOS, a word, EOS), got {self.context_length}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists); ``ITSELFConfig(**d)`` rebuilds it."""
        return json_ready(dataclasses.asdict(self))


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be an int or (H, W), got {value!r}") from None
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"{name} must be (H, W) with positive entries, got {value!r}")
    return out  # type: ignore[return-value]


def json_ready(obj: Any) -> Any:
    """Tuples to lists, recursively (what JSON/YAML round-trips give back)."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------------
# backbone construction and local weights
# ----------------------------------------------------------------------------------------------------------------
def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the ITSELF model needs open_clip_torch: pip install 'attnselect[open_clip]'") from exc
    return open_clip


def build_clip(config: ITSELFConfig) -> nn.Module:
    """An open_clip ``CLIP`` built from ``config`` with random weights (no download).

    The named open_clip config (``config.backbone``) gives the base; ``vision_cfg`` / ``text_cfg`` override its
    fields; ``image_size`` and ``context_length`` always win.

    Args:
        config: the model configuration (only its backbone fields are read).

    Returns:
        An open_clip ``CLIP`` (``encode_image([B,3,H,W]) -> [B,E]``, ``encode_text([B,T]) -> [B,E]``).

    Examples:
        >>> cfg = ITSELFConfig(
        ...     backbone=None, embed_dim=32, image_size=(32, 16), context_length=16, num_classes=4, local_dim=64,
        ...     vision_cfg={"layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        ...     text_cfg={"vocab_size": 1000, "width": 32, "heads": 2, "layers": 2},
        ... )  # a tiny random backbone; the default is CLIP ViT-B/16
        >>> clip = build_clip(cfg)
        >>> clip.encode_image(torch.randn(2, 3, 32, 16)).shape  # [B,3,H,W] -> [B,E]
        torch.Size([2, 32])
    """
    open_clip = _open_clip()
    if config.backbone is not None:
        base = open_clip.get_model_config(config.backbone)
        if base is None:
            raise ValueError(f"backbone: unknown open_clip model config {config.backbone!r}")
        from ..hooks.open_clip import hub_download_reason

        why = hub_download_reason(base)
        if why:
            raise ValueError(
                f"backbone {config.backbone!r}: {why}; attnselect never downloads. ITSELF builds the backbone as an "
                "open_clip CLIP from a bundled config (e.g. 'ViT-B-16')"
            )
        base = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    else:
        base = {"vision_cfg": {}, "text_cfg": {}}
    embed_dim = config.embed_dim if config.embed_dim is not None else base.get("embed_dim")
    if embed_dim is None:
        raise ValueError("embed_dim is required when backbone is None")
    vision = {**base.get("vision_cfg", {}), **config.vision_cfg, "image_size": tuple(config.image_size)}
    text = {**base.get("text_cfg", {}), **config.text_cfg, "context_length": config.context_length}
    for key in ("layers", "width", "patch_size"):
        if key not in vision:
            raise ValueError(f"vision_cfg needs {key!r} when backbone is None")
    quick_gelu = bool(base.get("quick_gelu", False) or config.quick_gelu)
    clip = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    # The CLIP contrastive temperature (and SigLIP bias) are unused by ITSELF; frozen so DDP sees no unused grads.
    for name in ("logit_scale", "logit_bias"):
        p = getattr(clip, name, None)
        if isinstance(p, nn.Parameter):
            p.requires_grad_(False)
    return clip


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a local weights file into a flat ``name -> tensor`` dict.

    Accepts a safetensors file, a ``torch.save`` state dict or checkpoint (keys ``state_dict`` / ``model`` /
    ``module`` are unwrapped, ``module.`` prefixes stripped) and, as a last resort, a TorchScript archive such as
    the original OpenAI CLIP files (loaded with ``torch.jit.load``, which runs the archive's code: only use files you
    trust). Never downloads anything.

    Args:
        path: the local weights file.

    Returns:
        ``{name: tensor}``.

    Examples:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     torch.save({"state_dict": {"module.fc.weight": torch.ones(2, 2)}}, os.path.join(tmp, "w.pt"))
        ...     sd = read_state_dict(os.path.join(tmp, "w.pt"))
        >>> list(sd)  # unwrapped, prefix stripped
        ['fc.weight']
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained: {path!r} is not a local file (weights are never downloaded)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a TorchScript archive or a pickle that weights_only refuses
            try:
                sd = torch.jit.load(path, map_location="cpu").state_dict()
                logger.info("pretrained: read %s as a TorchScript archive", path)
            except Exception:
                raise ValueError(
                    f"pretrained: could not read {path!r} as a state dict ({exc}); save the weights with "
                    "torch.save(model.state_dict(), ...) or as safetensors"
                ) from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping):
        raise ValueError(f"pretrained: {path!r} does not hold a state dict (got {type(sd).__name__})")
    out = {}
    for k, v in sd.items():
        if isinstance(v, Tensor):
            out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def interpolate_pos_embed(pos: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None) -> Tensor:
    """Resize a ViT positional embedding ``[1 + g0*g1, W]`` to ``[1 + G0*G1, W]`` (bilinear; the CLS row is kept).

    Args:
        pos: the pretrained embedding, CLS row first.
        new_grid: target patch grid ``(rows, cols)``, e.g. ``(24, 8)`` for 384 x 128 with 16-pixel patches.
        old_grid: source grid; default square (``14 x 14`` for a 197-row embedding).

    Returns:
        The resized embedding ``[1 + G0*G1, W]`` in the input dtype.

    Examples:
        >>> pos = torch.randn(1 + 14 * 14, 768)  # CLS row + a 14 x 14 grid (224 x 224, 16-pixel patches)
        >>> out = interpolate_pos_embed(pos, (24, 8))  # 384 x 128 input
        >>> out.shape, torch.equal(out[0], pos[0])
        (torch.Size([193, 768]), True)
    """
    if pos.dim() != 2:
        raise ValueError(f"pos must have shape [1 + g0*g1, W], got {tuple(pos.shape)}")
    n_old = pos.shape[0] - 1
    if old_grid is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise ValueError(f"pos has {n_old} patch rows, not a square grid; pass old_grid=(rows, cols)")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n_old:
        raise ValueError(f"old_grid {old_grid} does not match the {n_old} patch rows of pos")
    if tuple(old_grid) == tuple(new_grid):
        return pos
    cls, grid = pos[:1], pos[1:]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1)
    return torch.cat([cls, grid.to(pos.dtype)], dim=0)


def load_clip_weights(
    clip: nn.Module, source: str | os.PathLike | Mapping[str, Tensor], *, strict: bool = True
) -> None:
    """Load CLIP weights from a local file (or a state dict) into an open_clip ``CLIP``, resizing position tables.

    The vision positional embedding is interpolated to the model's patch grid (e.g. 14 x 14 -> 24 x 8 for ViT-B/16 at
    384 x 128); a longer text positional embedding is cut to the model's context length. Keys prefixed ``clip.``
    (an :class:`ITSELF` state dict) are accepted.

    Args:
        clip: the open_clip ``CLIP`` to fill (modified in place).
        source: a local weights file (see :func:`read_state_dict`) or a state dict.
        strict: raise when tensors are missing or unexpected.

    Raises:
        ValueError: when ``strict`` and tensors are missing or have shapes that cannot be adapted.

    Examples:
        >>> cfg = ITSELFConfig(
        ...     backbone=None, embed_dim=32, image_size=(32, 16), context_length=16, num_classes=4, local_dim=64,
        ...     vision_cfg={"layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        ...     text_cfg={"vocab_size": 1000, "width": 32, "heads": 2, "layers": 2},
        ... )  # a tiny random backbone; the default is CLIP ViT-B/16
        >>> clip, other = build_clip(cfg), build_clip(cfg)
        >>> load_clip_weights(clip, other.state_dict())
        >>> torch.equal(clip.visual.conv1.weight, other.visual.conv1.weight)
        True
    """
    sd = dict(read_state_dict(source) if not isinstance(source, Mapping) else source)
    if any(k.startswith("clip.") for k in sd):
        sd = {k[len("clip.") :]: v for k, v in sd.items() if k.startswith("clip.")}
    visual = clip.visual
    key = "visual.positional_embedding"
    if key in sd and sd[key].shape != visual.positional_embedding.shape:
        grid = tuple(int(g) for g in visual.grid_size)
        sd[key] = interpolate_pos_embed(sd[key], grid)
        logger.info("pretrained: interpolated the vision position grid to %s", grid)
    key = "positional_embedding"
    if key in sd and sd[key].shape[0] > clip.positional_embedding.shape[0]:
        sd[key] = sd[key][: clip.positional_embedding.shape[0]]
    for extra in ("attn_mask", "input_resolution", "context_length", "vocab_size"):  # OpenAI archive metadata
        sd.pop(extra, None)
    own = clip.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        shapes = ", ".join(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:5])
        raise ValueError(f"pretrained: shapes do not match the backbone config ({shapes})")
    result = clip.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if k not in ("attn_mask", "logit_bias")]
    if strict and (missing or result.unexpected_keys):
        raise ValueError(
            f"pretrained: the file does not match the backbone: missing {missing[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    logger.info("pretrained: loaded %d tensors", len(sd))


# ----------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------
class ITSELF(nn.Module):
    """CLIP dual encoder + a bank per tower + global and local TAL / CID / ID losses.

    Args:
        config: an :class:`ITSELFConfig` (default: the published ViT-B/16 setting); keyword arguments override its
            fields, e.g. ``ITSELF(num_classes=3701, selection="consistent")``.

    Encoding (one backbone pass per tower):
        ``encode_image(images [B,3,H,W]) -> (global [B,E], local [B,E_local])``;
        ``encode_text(ids [B,T]) -> (global [B,E], local [B,E_local])`` (local is None with ``use_local=False``).
        Global = projected CLS / EOS token (EOS = argmax of the ids); local = the bank's pooled embedding.

    Training: ``forward(images, ids, pids)`` returns a dict of fp32 scalar losses whose ``"loss"`` entry is their
    plain sum. The ATS step is never advanced implicitly: call ``model.ats.step()`` once before each training
    forward (the published counter starts at 1).

    Selection (``config.selection``): training always uses MARS over ``config.layers`` with the ATS k;
    inference uses the last layer only with ``k = int(n * eval_ratio)`` (``"reference"``, the published code) or the
    same MARS layers with the final ATS k (``"consistent"``).

    Examples:
        >>> cfg = ITSELFConfig(
        ...     backbone=None, embed_dim=32, image_size=(32, 16), context_length=16, num_classes=4, local_dim=64,
        ...     vision_cfg={"layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        ...     text_cfg={"vocab_size": 1000, "width": 32, "heads": 2, "layers": 2},
        ... )  # a tiny random backbone; the default is CLIP ViT-B/16
        >>> model = ITSELF(cfg)
        >>> images, ids = torch.randn(2, 3, 32, 16), torch.randint(1, 999, (2, 16))  # [B,3,H,W], [B,T]
        >>> [x.shape for x in model.encode_image(images)]  # global [B,E], local [B,E_local]
        [torch.Size([2, 32]), torch.Size([2, 64])]
        >>> losses = model(images, ids, torch.tensor([0, 1]))  # training mode: a dict of scalar losses
        >>> sorted(losses)
        ['cid_global', 'cid_local', 'id_global', 'id_local', 'loss', 'tal_global', 'tal_local']
    """

    def __init__(self, config: ITSELFConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = ITSELFConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if not isinstance(config, ITSELFConfig):
            raise TypeError(f"config must be an ITSELFConfig, got {type(config).__name__}")
        self.config = config
        self.clip = build_clip(config)
        if config.pretrained:
            load_clip_weights(self.clip, config.pretrained)
        self.embed_dim = int(self.clip.text_projection.shape[1])
        self.vision_layers = len(self.clip.visual.transformer.resblocks)
        self.text_layers = len(self.clip.transformer.resblocks)
        gather = config.gather_losses
        if gather is None:
            gather = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.gather = bool(gather)

        self.ats: AdaptiveTokenScheduler | None = None
        self.image_bank: AttentiveBank | None = None
        self.text_bank: AttentiveBank | None = None
        self._inference_banks: dict[str, AttentiveBank] = {}
        if config.use_local:
            self.ats = AdaptiveTokenScheduler(
                rho_start=config.rho_start,
                rho_end=config.rho_end,
                total_steps=config.ats_total_steps,
                schedule=config.ats_schedule,
            )
            self.image_bank = self._make_bank()
            self.text_bank = self._make_bank()
            # Published inference: the last layer's map alone (a one-layer rollout without discard ranks tokens
            # exactly like the raw map row) and k = int(n * eval_ratio). These banks share the adapters and pools of
            # the training banks and hold no parameters of their own, so they are kept out of the module tree.
            for name, bank in (("image", self.image_bank), ("text", self.text_bank)):
                self._inference_banks[name] = AttentiveBank(
                    rollout=MultiLayerRollout(
                        layers=("late",), discard_ratio=0.0, head_fusion=config.head_fusion, protect=config.protect
                    ),
                    scheduler=None,
                    ratio=config.eval_ratio,
                    adapter=bank.adapter,
                    pool=bank.pool,
                )

        from ..losses import CIDLoss

        self.global_cid: CIDLoss | None = None
        self.local_cid: CIDLoss | None = None
        if "cid" in config.losses:
            kw = dict(negative_label=config.cid_negative_label, use_id="id" in config.losses, gather=self.gather)
            self.global_cid = CIDLoss(self.embed_dim, config.num_classes, **kw)
            if config.use_local:
                self.local_cid = CIDLoss(config.local_dim, config.num_classes, **kw)

        self._captures: dict[str, Any] = {}
        self._capture_layers = {
            "image": self._layers_to_capture(self.vision_layers),
            "text": self._layers_to_capture(self.text_layers),
        }
        self.last_banks: dict[str, BankOutput] = {}

    # ------------------------------------------------------------------------------------------------ construction
    def _make_bank(self) -> AttentiveBank:
        c = self.config
        return AttentiveBank(
            rollout=MultiLayerRollout(
                layers=c.layers, discard_ratio=c.discard_ratio, head_fusion=c.head_fusion, protect=c.protect
            ),
            scheduler=self.ats,
            ratio=c.eval_ratio,
            adapter=TokenAdapter(self.embed_dim, c.local_dim, hidden_dim=c.adapter_hidden, norm=c.adapter_norm),
            pool=c.pool,
        )

    def _layers_to_capture(self, depth: int) -> tuple[int, ...]:
        if not self.config.use_local:
            return ()
        return tuple(sorted(set(resolve_layers(self.config.layers, depth)) | {depth - 1}))

    def _capture(self, tower: str):
        """The attention capture of one tower, registered on first use (hooks live as long as the model)."""
        cap = self._captures.get(tower)
        if cap is None:
            from ..hooks import capture_attention

            cap = capture_attention(
                self.clip,
                list(self._capture_layers[tower]),
                head_fusion=self.config.head_fusion,
                detach=True,
                tower="vision" if tower == "image" else "text",
            )
            self._captures[tower] = cap
        return cap

    def remove_hooks(self) -> None:
        """Remove the capture hooks from the backbone (they are placed again on the next encode)."""
        for cap in self._captures.values():
            cap.remove()
        self._captures.clear()

    def __deepcopy__(self, memo: dict) -> ITSELF:
        import copy

        # Hooks belong to this instance's backbone: a copy places its own on first use.
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = {} if key == "_captures" else copy.deepcopy(value, memo)
        return clone

    # ------------------------------------------------------------------------------------------------ selection
    def _bank_for(self, tower: str) -> tuple[AttentiveBank, int | None]:
        """The bank and the ATS step to use for ``tower`` in the current mode."""
        bank = self.image_bank if tower == "image" else self.text_bank
        assert bank is not None and self.ats is not None
        if self.training:
            return bank, None  # the scheduler's own counter
        if self.config.selection == "reference":
            return self._inference_banks[tower], None
        return bank, self.ats.total_steps  # final ATS k

    def num_kept(self, tower: str, n: int, *, training: bool | None = None) -> int:
        """Tokens the bank of ``tower`` keeps out of ``n`` selectable ones in training or inference mode."""
        if self.ats is None:
            raise ValueError("the model has no local branch (use_local=False)")
        training = self.training if training is None else training
        if training:
            return self.ats.num_tokens(n)
        if self.config.selection == "reference":
            return self._inference_banks[tower].num_tokens(n)
        return self.ats.num_tokens(n, step=self.ats.total_steps)

    # ------------------------------------------------------------------------------------------------ encoders
    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Global and local image embeddings from one backbone pass.

        Args:
            images: ``[B,3,H,W]`` normalised images with ``(H, W) = config.image_size``.

        Returns:
            ``(global [B,E], local [B,E_local] or None)``, not normalised.
        """
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B,3,H,W], got {getattr(images, 'shape', type(images))}")
        if tuple(images.shape[-2:]) != tuple(self.config.image_size):
            raise ValueError(f"images must be {tuple(self.config.image_size)} (H, W), got {tuple(images.shape[-2:])}")
        if self.image_bank is None:
            return self.clip.encode_image(images), None
        cap = self._capture("image")
        glob = self.clip.encode_image(images)
        bank, step = self._bank_for("image")
        out = bank(cap.tokens, cap.maps, query=0, step=step, num_layers=self.vision_layers)
        self.last_banks["image"] = out
        return glob, out.embedding

    def encode_text(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """Global and local caption embeddings from one backbone pass.

        Args:
            ids: ``[B,T]`` int64 token ids, ``[SOS] + words + [EOS]`` zero-padded; EOS is the largest id. With the
                local branch every caption needs at least one word (a ValueError names those without; on CUDA the
                bank's check, which does not stop the host, reports it).

        Returns:
            ``(global [B,E], local [B,E_local] or None)``, not normalised.
        """
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"ids must be an integer tensor [B,T], got {getattr(ids, 'shape', type(ids))}")
        if ids.shape[1] != self.config.context_length:
            raise ValueError(f"ids must have T = context_length = {self.config.context_length}, got {ids.shape[1]}")
        if self.text_bank is None:
            return self.clip.encode_text(ids), None
        # on CUDA this check would stop the host every step; there the bank's own check (no sync) reports it
        empty = torch.nonzero((ids != 0).sum(dim=1) <= 2).flatten() if ids.device.type == "cpu" else ids[:0, 0]
        if empty.numel():
            raise ValueError(
                f"ids: caption(s) {empty[:20].tolist()} have no word token between SOS and EOS, so the local branch "
                "has nothing to select; drop empty captions (the published code returns NaN embeddings for them)"
            )
        cap = self._capture("text")
        glob = self.clip.encode_text(ids)
        eos = ids.argmax(dim=-1)
        exclude = torch.stack([torch.zeros_like(eos), eos], dim=1)  # SOS and EOS are never kept
        bank, step = self._bank_for("text")
        out = bank(
            cap.tokens, cap.maps, query=eos, valid=ids != 0, exclude=exclude, step=step, num_layers=self.text_layers
        )
        self.last_banks["text"] = out
        return glob, out.embedding

    # ------------------------------------------------------------------------------------------------ retrieval
    @staticmethod
    def _cosine(a: Tensor, b: Tensor) -> Tensor:
        # fp32 with autocast off: an fp16/bf16 matmul keeps 3 significant digits and turns close scores into ties.
        with torch.autocast(device_type=a.device.type, enabled=False):
            return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).t()

    def similarity(
        self,
        img: tuple[Tensor, Tensor | None] | Tensor,
        txt: tuple[Tensor, Tensor | None] | Tensor,
        lam: float | None = None,
    ) -> Tensor:
        """Fused cosine similarity ``lam * S_global + (1 - lam) * S_local``, in fp32 with autocast switched off.

        Args:
            img: ``(global [G,E], local [G,E_local])`` from :meth:`encode_image` (a lone tensor = global only).
            txt: ``(global [Q,E], local [Q,E_local])`` from :meth:`encode_text`.
            lam: weight of the global similarity (default ``config.lam`` = 0.68).

        Returns:
            ``[Q, G]`` fp32 (rows: captions = queries, columns: images = gallery), ready for
            :func:`attnselect.metrics.retrieval_metrics`.
        """
        lam = self.config.lam if lam is None else float(lam)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        ig, il = img if isinstance(img, (tuple, list)) else (img, None)
        tg, tl = txt if isinstance(txt, (tuple, list)) else (txt, None)
        s = self._cosine(tg, ig)
        if il is None or tl is None or lam == 1.0:
            if lam != 1.0 and (il is None) != (tl is None):
                raise ValueError("similarity: give local embeddings for both images and texts, or for neither")
            return s
        with torch.autocast(device_type=s.device.type, enabled=False):
            return lam * s + (1.0 - lam) * self._cosine(tl, il)

    # ------------------------------------------------------------------------------------------------ training
    def forward(self, images: Tensor, ids: Tensor, pids: Tensor | None = None) -> dict[str, Tensor]:
        """Training losses (``pids`` given, training mode) or the four embeddings (otherwise).

        Returns:
            Training: ``{"tal_global", "cid_global", "id_global", "tal_local", ..., "loss"}`` fp32 scalars (those the
            configured losses produce; ``"loss"`` = their plain sum). Otherwise: ``{"image_global", "image_local",
            "text_global", "text_local"}``.
        """
        losses = pids is not None and self.training
        if losses:  # validated before the (expensive) encoders run
            if not isinstance(pids, Tensor) or pids.shape != (images.shape[0],):
                raise ValueError(f"pids must have shape [B] = [{images.shape[0]}], got {getattr(pids, 'shape', pids)}")
            if pids.is_floating_point() or pids.is_complex() or pids.dtype == torch.bool:
                raise TypeError(f"pids must hold integer identity labels, got dtype {pids.dtype}")
            if images.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"images and ids must have the same batch size, got {images.shape[0]} and {ids.shape[0]}"
                )
        img_g, img_l = self.encode_image(images)
        txt_g, txt_l = self.encode_text(ids)
        if not losses:
            return {"image_global": img_g, "image_local": img_l, "text_global": txt_g, "text_local": txt_l}
        pids = pids.to(device=img_g.device, dtype=torch.long)
        out: dict[str, Tensor] = {}
        pairs = [("global", img_g, txt_g, self.global_cid)]
        if img_l is not None and txt_l is not None:
            pairs.append(("local", img_l, txt_l, self.local_cid))
        from ..losses import sdm_loss, tal_loss

        c = self.config
        for name, v, t, cid in pairs:
            if "tal" in c.losses:
                out[f"tal_{name}"] = tal_loss(v, t, pids, tau=c.tau, margin=c.margin, gather=self.gather)
            if "sdm" in c.losses:
                out[f"sdm_{name}"] = sdm_loss(v, t, pids, gather=self.gather)
            if cid is not None:
                res = cid(v, t, pids)
                out[f"cid_{name}"] = res.pair_loss
                if cid.use_id:
                    out[f"id_{name}"] = res.id_loss
        out["loss"] = torch.stack(list(out.values())).sum()
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"selection={c.selection!r}, layers={c.layers}, use_local={c.use_local}, pool={c.pool!r}, "
            f"losses={'+'.join(c.losses)}, num_classes={c.num_classes}"
        )
