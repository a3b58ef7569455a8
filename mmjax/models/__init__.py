"""mmjax models: pure linen Modules, one file per family; `build_model` makes one from a config."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.bert import BertModel
from mmjax.models.clip import CLIP
from mmjax.models.fusion_model import FusionModel
from mmjax.models.text import TextTransformer
from mmjax.models.uniter import UNITER
from mmjax.models.vilbert import ViLBERT
from mmjax.models.vilt import ViLT
from mmjax.models.vit import ViT, ViTModel

MODELS: dict[str, type[nn.Module]] = {"clip": CLIP, "vilt": ViLT, "uniter": UNITER, "vilbert": ViLBERT,
                                     "fusion": FusionModel, "bert": BertModel, "vit": ViTModel}

# Nested dict fields -> the Module class their kwargs go to (validated like top-level fields).
_SUBMODULE_FIELDS: dict[tuple[str, str], type[nn.Module]] = {
    ("clip", "image"): ViT, ("clip", "text"): TextTransformer,
    ("fusion", "image"): ViT, ("fusion", "text"): TextTransformer,
    ("bert", "text"): TextTransformer, ("vit", "image"): ViT,
}
# Config keys that describe the model but are not Module fields.
_META_KEYS = ("name", "variant")


def _fields(cls: type[nn.Module]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def _check_fields(cls: type[nn.Module], kwargs: Mapping[str, Any], where: str) -> None:
    valid = _fields(cls)
    for key in kwargs:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3) or valid
            raise ValueError(f"Unknown field {where}.{key} for {cls.__name__}; nearest valid: {near}")


def _canon(value: Any) -> Any:
    """Dtype strings -> jnp dtypes; nested dicts -> FrozenDict (hashable Module fields)."""
    if isinstance(value, Mapping):
        return flax.core.FrozenDict({k: _canon(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_canon(v) for v in value)
    return value


def _dtype(value: Any) -> Any:
    return jnp.dtype(value).type if isinstance(value, str) else value


def build_model(model_config: Mapping[str, Any]) -> nn.Module:
    """Module from a model ConfigDict (`name` picks the class; other fields are its dataclass fields)."""
    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if "name" not in cfg:
        raise ValueError(f"model config needs a 'name'; known models: {sorted(MODELS)}")
    name = cfg["name"]
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; known models: {sorted(MODELS)}")
    cls = MODELS[name]
    kwargs = {k: v for k, v in cfg.items() if k not in _META_KEYS}
    _check_fields(cls, kwargs, "model")
    for key, value in list(kwargs.items()):
        if (name, key) in _SUBMODULE_FIELDS:
            sub = dict(value)
            _check_fields(_SUBMODULE_FIELDS[(name, key)], sub, f"model.{key}")
            sub = {k: _dtype(v) if k.endswith("dtype") else v for k, v in sub.items()}
            kwargs[key] = _canon(sub)
        elif key.endswith("dtype"):
            kwargs[key] = _dtype(value)
        else:
            kwargs[key] = _canon(value)
    return cls(**kwargs)


__all__ = ["BertModel", "CLIP", "FusionModel", "MODELS", "TextTransformer", "UNITER", "ViLBERT", "ViLT", "ViT", "ViTModel", "build_model"]
