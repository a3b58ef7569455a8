"""Tower registry: the single-modality encoders a FusionModel can be built from, by `kind`.

A tower config is a dict {"kind": KIND, **fields of KIND's Module}. Each registry entry says which Module class
the fields go to, which batch keys the tower reads, and how to call it uniformly:

    tokens, mask = kind.encode(module, batch, train)     tokens [B, N, D], mask int32 [B, N] (1 = real)

    pooled = kind.pool(module, batch, train)            pooled [B, D] (the tower's own pooling)

    kind   Module            batch keys                                     mask
    vit    ViT               image                                          all ones
    text   TextTransformer   text_ids, text_mask (+ optional text_type_ids)   text_mask > 0
    audio  AudioEncoder      audio, audio_length                            patches holding signal

Adding a modality is one more `TOWERS` entry: its Module, the batch keys it reads, `encode` and `pool` functions,
and, if it has one, `word_table` (a token table that a tied MLM decoder may read).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.audio import AudioEncoder
from mmjax.models.layers import Array
from mmjax.models.text import TextTransformer
from mmjax.models.vit import ViT

# (tower module, batch, train) -> (tokens [B, N, D], mask int32 [B, N])
EncodeFn = Callable[[nn.Module, Mapping[str, Array], bool], tuple[Array, Array]]
# (tower module, batch, train) -> pooled [B, D]
PoolFn = Callable[[nn.Module, Mapping[str, Array], bool], Array]


@dataclasses.dataclass(frozen=True)
class TowerKind:
    """One registry entry: how to build and call a tower of this kind."""

    module: type[nn.Module]  # the Module class its config fields go to
    inputs: tuple[str, ...]  # batch keys it needs
    encode: EncodeFn
    pool: Optional[PoolFn] = None  # the tower's own pooled output (a dual encoder embeds it); None: tokens only
    optional_inputs: tuple[str, ...] = ()  # batch keys it reads when present
    # The batch key holding the tower's padding mask, if the batch carries one (its mask is then not returned again
    # as "{modality}_mask" by FusionModel; towers without one get "{modality}_mask" in the outputs).
    mask_input: Optional[str] = None
    # A bound, already called tower -> its token table [V, D], for a decoder tied to it (MLM); None: no table.
    word_table: Optional[Callable[[nn.Module], Array]] = None
    # Tower fields -> whether tokens[:, 0] is a cls token rather than content (word-patch alignment skips it).
    cls_first: Optional[Callable[[Mapping[str, Any]], bool]] = None


def field_value(cls: type[nn.Module], fields: Mapping[str, Any], name: str) -> Any:
    """fields[name] if given, else the dataclass default of `cls.name`."""
    return fields[name] if name in fields else cls.__dataclass_fields__[name].default


def _encode_vit(tower: nn.Module, batch: Mapping[str, Array], train: bool) -> tuple[Array, Array]:
    """Every ViT token (cls first, if any) is real; a `patch_mask` in the batch masks patches (MPP)."""
    _, tokens = tower(batch["image"], train=train, patch_mask=batch.get("patch_mask"))
    return tokens, jnp.ones(tokens.shape[:2], jnp.int32)


def _encode_text(tower: nn.Module, batch: Mapping[str, Array], train: bool) -> tuple[Array, Array]:
    """Text tokens under text_mask (any nonzero = real, returned as int32 0/1)."""
    text_ids, text_mask = batch["text_ids"], batch["text_mask"]
    if text_ids.ndim != 2 or text_mask.shape != text_ids.shape:
        raise ValueError(f"text_ids and text_mask must both be [B, L]; got {text_ids.shape} and {text_mask.shape}")
    text_mask = (jnp.asarray(text_mask) > 0).astype(jnp.int32)
    _, tokens = tower(text_ids, text_mask, batch.get("text_type_ids"), train=train)
    return tokens, text_mask


def _encode_audio(tower: nn.Module, batch: Mapping[str, Array], train: bool) -> tuple[Array, Array]:
    """Patch tokens; a patch is real when its first frame holds signal (AudioEncoder.token_mask)."""
    audio, length = batch["audio"], batch["audio_length"]
    _, tokens = tower(audio, length, train=train)
    return tokens, tower.token_mask(length, audio.shape[1])


def _text_word_table(tower: nn.Module) -> Array:
    """The TextTransformer's word table, read through its scope (boxed at init, plain or boxed in apply), so a tied
    decoder's gradient sums with the embedding's."""
    return nn.unbox(tower.variables["params"]["embeddings"]["word_embedding"])


def _vit_cls_first(fields: Mapping[str, Any]) -> bool:
    """A ViT's tokens start with its cls token iff cls_token (default: pool == "cls")."""
    cls_token = field_value(ViT, fields, "cls_token")
    return field_value(ViT, fields, "pool") == "cls" if cls_token is None else bool(cls_token)


TOWERS: dict[str, TowerKind] = {
    "vit": TowerKind(module=ViT, inputs=("image",), encode=_encode_vit,
                     pool=lambda tower, batch, train: tower(batch["image"], train=train)[0], cls_first=_vit_cls_first,
                     optional_inputs=("patch_mask",)),
    "text": TowerKind(module=TextTransformer, inputs=("text_ids", "text_mask"), encode=_encode_text,
                      pool=lambda tower, batch, train: tower(batch["text_ids"], batch["text_mask"],
                                                             train=train)[0],
                      optional_inputs=("text_type_ids",), mask_input="text_mask", word_table=_text_word_table),
    "audio": TowerKind(module=AudioEncoder, inputs=("audio", "audio_length"), encode=_encode_audio,
                       pool=lambda tower, batch, train: tower(batch["audio"], batch["audio_length"], train=train)[0],
                       cls_first=lambda fields: bool(field_value(AudioEncoder, fields, "cls_token"))
                       or field_value(AudioEncoder, fields, "pool") == "cls"),
}


def tower_kind(kind: Any, where: str = "tower") -> TowerKind:
    """The registry entry of `kind`; a missing or unknown kind raises ValueError naming the known ones."""
    if kind not in TOWERS:
        near = difflib.get_close_matches(str(kind), list(TOWERS), n=3)
        hint = f" (did you mean {near}?)" if near else ""
        raise ValueError(f"{where}: unknown tower kind {kind!r}{hint}; known kinds: {sorted(TOWERS)} "
                         "(a tower config is {'kind': KIND, **that Module's fields})")
    return TOWERS[kind]


__all__ = ["TOWERS", "TowerKind", "field_value", "tower_kind"]
