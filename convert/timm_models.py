"""The ANNs the converter accepts: timm Vision Transformers, by name, with their weights.

Weights come from ``pretrained`` (timm's own hub loading; needs network), a local
``checkpoint`` (safetensors, or a torch file loaded with ``weights_only=True``: no
arbitrary unpickling), or neither (random init, e.g. before ``--train-epochs``).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, ConversionError

logger = logging.getLogger(__name__)

ALIASES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
           "vit_base": "vit_base_patch16_224"}
SUPPORTED = re.compile(r"^(vit_(tiny|small|base|large)_patch\d+_\d+|deit3?_(tiny|small|base)"
                       r"_(distilled_)?patch\d+_\d+)(\..+)?$")


def canonical_name(name: str) -> str:
    """Resolve a short alias (``vit_small``) to the timm name."""
    return ALIASES.get(name, name)


def supported_models() -> list[str]:
    """Names and patterns the converter accepts (for error messages and --help)."""
    return [*ALIASES, "vit_{tiny,small,base,large}_patch<P>_<S>",
            "deit_{tiny,small,base}[_distilled]_patch<P>_<S>", "deit3_{small,base}_patch<P>_<S>"]


def parse_model_kwargs(text: Optional[str]) -> dict[str, Any]:
    """``"patch_size=4,depth=6,qkv_bias=false"`` -> dict with ints, floats, bools, strings."""
    out: dict[str, Any] = {}
    if not text:
        return out
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ConfigError(f"--model-kwargs items must be key=value; got {item!r} "
                              f"(example: patch_size=4,depth=6)")
        key, value = (s.strip() for s in item.split("=", 1))
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif low in ("none", "null"):
            out[key] = None
        else:
            for cast in (int, float):
                try:
                    out[key] = cast(value)
                    break
                except ValueError:
                    continue
            else:
                out[key] = value
    return out


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be loaded as a weights-only torch file "
                              f"({type(exc).__name__}); save a state dict or safetensors") from None
    for key in ("state_dict", "model", "model_ema"):  # common training-script wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def create_vit(name: str, *, img_size: int, in_chans: int, num_classes: int,
               pretrained: bool = False, checkpoint: Optional[str] = None,
               model_kwargs: Optional[dict] = None) -> nn.Module:
    """A timm ViT sized for the data set, with weights from ``pretrained`` or ``checkpoint``."""
    import timm

    full = canonical_name(name)
    if not SUPPORTED.match(full):
        raise ConversionError(f"model {name!r} is not supported by the converter; supported: "
                              f"{'; '.join(supported_models())}")
    kwargs = dict(img_size=img_size, in_chans=in_chans, num_classes=num_classes)
    kwargs.update(model_kwargs or {})
    if pretrained and checkpoint:
        raise ConfigError("give either --pretrained or --checkpoint, not both")
    try:
        model = timm.create_model(full, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"timm could not build {full} with {kwargs}: {exc}") from None
    except (RuntimeError, OSError) as exc:  # hub download failed (offline)
        raise CheckpointError(f"--pretrained: timm could not fetch weights for {full} ({exc}); "
                              f"offline, use --checkpoint FILE or --train-epochs N") from None
    if checkpoint:
        state = _load_state_dict(Path(checkpoint))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).split("\n")[0:3]
            raise CheckpointError(f"{checkpoint} does not match {full} with {kwargs}: "
                                  f"{' '.join(first)} (check --model-kwargs)") from None
    return model.eval()


def check_patch_grid(img_size: int, patch_size: int) -> None:
    """A patch grid smaller than 2x2 is a ConversionError with the patch size that fits."""
    grid = img_size // patch_size
    if grid >= 2:
        return
    fits = max([p for p in range(1, img_size + 1) if img_size % p == 0 and img_size // p >= 7]
               or [1])
    raise ConversionError(
        f"a {img_size}x{img_size} image with patch_size {patch_size} leaves a {grid}x{grid} "
        f"patch grid: nothing for attention or token halting to work on; fix: --model-kwargs "
        f"patch_size={fits} ({img_size // fits}x{img_size // fits} patches)")


def name_patch_size(name: str) -> Optional[int]:
    """The patch size a timm ViT name states (``vit_small_patch16_224`` -> 16), if any."""
    import re

    match = re.search(r"patch(\d+)", canonical_name(name))
    return int(match.group(1)) if match else None


def check_convertible(vit: nn.Module) -> None:
    """Raise ConversionError naming the first feature the converter does not handle."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise ConversionError(f"{type(vit).__name__} is not a timm VisionTransformer; "
                              f"supported: {'; '.join(supported_models())}")
    check_patch_grid(int(vit.patch_embed.img_size[0]), int(vit.patch_embed.patch_size[0]))
    problems = []
    if getattr(vit, "reg_token", None) is not None:
        problems.append("register tokens")
    if getattr(vit, "attn_pool", None) is not None:
        problems.append("attention pooling")
    if getattr(vit, "no_embed_class", False):
        problems.append("no_embed_class")
    if vit.global_pool not in ("token", "avg"):
        problems.append(f"global_pool={vit.global_pool!r}")
    for i, blk in enumerate(vit.blocks):
        attn = blk.attn
        if not hasattr(attn, "qkv") or getattr(attn, "gate", None) is not None:
            problems.append(f"block {i}: attention other than timm Attention")
        elif not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.norm, nn.Identity):
            problems.append(f"block {i}: qk/scale norm")
        if not isinstance(blk.mlp.act, nn.GELU) or not isinstance(blk.mlp.norm, nn.Identity):
            problems.append(f"block {i}: MLP other than Linear-GELU-Linear")
    if problems:
        raise ConversionError("cannot convert this ViT: unsupported " + ", ".join(problems[:3]))
