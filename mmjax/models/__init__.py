"""mmjax models: pure linen Modules, one file per family; `build_model` makes one from a config.

Families (clip, vilt, uniter, vilbert, lxmert, visualbert, oscar, fusion_model, bert, captioner, coca,
dual_encoder) never import each other: they share the towers (vit.py, text.py, audio.py, text_decoder.py, and the
tower registry towers.py), layers.py, heads.py and the fusion block library fusion.py.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.bert import BertModel
from mmjax.models.captioner import Captioner
from mmjax.models.clip import CLIP
from mmjax.models.coca import CoCa
from mmjax.models.dual_encoder import DualEncoder
from mmjax.models.fusion_model import FusionModel
from mmjax.models.lxmert import LXMERT
from mmjax.models.oscar import OSCAR
from mmjax.models.text import TextTransformer
from mmjax.models.text_decoder import TextDecoder
from mmjax.models.towers import TOWERS, tower_kind
from mmjax.models.uniter import UNITER
from mmjax.models.vilbert import ViLBERT
from mmjax.models.vilt import ViLT
from mmjax.models.visualbert import VisualBERT
from mmjax.models.vit import ViT, ViTModel

MODELS: dict[str, type[nn.Module]] = {"clip": CLIP, "vilt": ViLT, "uniter": UNITER, "vilbert": ViLBERT,
                                     "fusion": FusionModel, "bert": BertModel, "vit": ViTModel,
                                     "captioner": Captioner, "coca": CoCa, "dual_encoder": DualEncoder,
                                     "lxmert": LXMERT, "visualbert": VisualBERT, "oscar": OSCAR}

# Nested dict fields -> the Module class their kwargs go to (validated like top-level fields).
_SUBMODULE_FIELDS: dict[tuple[str, str], type[nn.Module]] = {
    ("clip", "image"): ViT, ("clip", "text"): TextTransformer,
    ("bert", "text"): TextTransformer, ("vit", "image"): ViT,
    ("captioner", "image"): ViT, ("captioner", "text"): TextDecoder,
    ("coca", "image"): ViT, ("coca", "text"): TextDecoder,
}
# Fields holding {modality: {"kind": KIND, **fields}} tower dicts (validated against towers.TOWERS[KIND].module).
_TOWER_FIELDS: frozenset[tuple[str, str]] = frozenset({("fusion", "towers"), ("dual_encoder", "towers")})
# Config keys that describe the model but are not Module fields.
_META_KEYS = ("name", "variant")


def _fields(cls: type[nn.Module]) -> list[str]:
    """The dataclass fields a config may set (flax's parent / name excluded)."""
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def _check_fields(cls: type[nn.Module], kwargs: Mapping[str, Any], where: str) -> None:
    """Unknown keys raise ValueError naming the nearest valid fields."""
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
    """Dtype names ("bfloat16") -> jnp scalar types; anything else unchanged."""
    return jnp.dtype(value).type if isinstance(value, str) else value


def _submodule_kwargs(cls: type[nn.Module], value: Mapping[str, Any], where: str) -> Any:
    """A nested dict of `cls` fields, validated, with dtype names converted, frozen."""
    sub = dict(value)
    _check_fields(cls, sub, where)
    return _canon({k: _dtype(v) if k.endswith("dtype") else v for k, v in sub.items()})


def _tower_kwargs(towers: Mapping[str, Any], where: str) -> Any:
    """{modality: {"kind": KIND, **fields}}: every kind known and every field one of its Module's."""
    out = {}
    for modality, value in dict(towers).items():
        sub = dict(value)
        kind = sub.pop("kind", None)
        module = tower_kind(kind, f"{where}.{modality}").module
        out[modality] = {"kind": kind, **_submodule_kwargs(module, sub, f"{where}.{modality}")}
    return _canon(out)


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
            kwargs[key] = _submodule_kwargs(_SUBMODULE_FIELDS[(name, key)], value, f"model.{key}")
        elif (name, key) in _TOWER_FIELDS:
            kwargs[key] = _tower_kwargs(value, f"model.{key}")
        elif key.endswith("dtype"):
            kwargs[key] = _dtype(value)
        else:
            kwargs[key] = _canon(value)
    return cls(**kwargs)


__all__ = ["BertModel", "CLIP", "Captioner", "CoCa", "DualEncoder", "FusionModel", "LXMERT", "MODELS", "OSCAR",
           "TOWERS", "TextDecoder", "TextTransformer", "UNITER", "ViLBERT", "ViLT", "ViT", "ViTModel", "VisualBERT",
           "build_model"]
