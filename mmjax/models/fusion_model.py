"""FusionModel: single-modality towers from the config + any `fusion` block + MLM / ITM heads.

Config shape (`towers` maps each modality name to a tower config, see `mmjax.models.towers`):

    towers = {"image": {"kind": "vit", **ViT fields}, "text": {"kind": "text", **TextTransformer fields}}
    fusion = "concat" (a fusion.FUSION_BLOCKS name), fusion_args = that block's fields

Data flow (B batch, N image tokens, L text positions, V vocabulary), for the image + text towers above:

    image [B, H, W, C] --ViT--------------> image tokens [B, N, D_img]  (every token, incl. a cls token if any;
                                                                          image mask = all ones [B, N])
    text_ids, text_mask [B, L] --TextTransformer--> text tokens [B, L, D_txt]
    out = fusion_block({"image": image tokens, "text": text tokens}, {"image": ones, "text": text_mask})
    pooled      [B, width]   = out["pooled"]
    itm_logits  [B, 2]       = Dense(2)(pooled)            ("late", "hybrid" blocks: their combined decision
                                                           out["logits"], so num_classes must be 2)
    text_tokens / image_tokens: see the table below
    mlm_logits  [B, L, V]    = HeadTransform(text_tokens) @ word_embedding.T + mlm_bias
                               (decoder tied to the text tower's embeddings/word_embedding table; when text_tokens
                               are not D_txt wide a Dense `mlm_proj` first maps them to D_txt; HeadTransform uses
                               the text tower's activation and ln_epsilon)
    mpp_pred    [B, N, p*p*C] = token_prediction(image patch tokens)   (mpp_head: masked patch prediction; the
                               ViT tower gets a learned [MASK] patch that the batch's `patch_mask` puts in place
                               of patches; patch_index [B, N] = raster order)

Every tower gives `{modality}_tokens`; towers whose mask is not a batch key (the ViT's) also give
`{modality}_mask`. The MLM head needs the tower named "text" (its kind must have a word table). `width` (the fusion
block's) defaults to the text tower's width (without one: the first tower's). Head outputs (itm_logits,
mlm_logits) are float32; everything else is in `dtype`.

Where text_tokens / image_tokens come from, and whether the text tokens (hence MLM) can see the image
(`FusionModel.fused_text`; `fused_image` likewise for the image tokens):

    block                 tokens from (width)                   fused_text (text tokens depend on the image)
    concat                out["streams"] = fused sequence split  yes if depth > 0 (depth 0: typed concat only)
    cross_attention       out["streams"] (width)                 yes if query == "text" and depth > 0; the
                                                                 non-query stream is only projected to width
    co_attention          out["streams"] (width)                 yes if depth > 0
    symmetric_cross_attention
                          out["streams"] (width)                 yes if depth > 0 (every stream attends to all
                                                                 the others in every layer)
    bottleneck            out["streams"] (width)                 only if fusion_layer <= depth - 2: a stream
                                                                 reads the bottleneck the *previous* layer
                                                                 averaged, so depth 1 never mixes into tokens
    shared_weights        out["streams"] (width)                 no: one shared encoder runs each modality
                                                                 separately
    sum, multiplicative_gated, additive_gated, concat_mlp, late, hybrid
                          the encoders' own (D_img, D_txt)       no (pooling-only blocks)

A block that returns no streams but a `sequence` concatenating every modality is split back by modality order.
Where fused_text is False the MLM objective is TEXT-ONLY masked language modelling: the masked words are predicted
from the caption alone, and only ITM (through `pooled`) trains the cross-modal part.

Parameters: {modality}_encoder (image_encoder, text_encoder: the towers), fusion (the block), itm_head,
mlm_proj (if needed), mlm_transform, mlm_bias, mpp_transform + mpp_decoder (mpp_head). Every parameter carries
logical axis names (see `layers`).
`dtype` and `param_dtype` override the same keys in every tower and in `fusion_args`; `remat=True` turns
rematerialisation on in every tower and the block (a sub-config may also turn it on by itself), with
`remat_policy` unless the sub-config names its own. `attention` other than "einsum" and `scan_layers=True` apply
to every tower (and `attention` to the block) the same way. The block's extra outputs (gates, per-modality logits,
bottleneck, ...) are sown as intermediates["fusion_extras"] (apply with mutable=["intermediates"] to read them).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import fusion as fusion_lib
from mmjax.models import heads, layers
from mmjax.models.layers import Array, Dtype, partitioned
from mmjax.models.towers import TowerKind, field_value, tower_kind

# The modality whose tower feeds the MLM head (and whose width is the fusion block's default width).
TEXT = "text"
IMAGE = "image"  # the modality masked patch prediction reads (a ViT tower)


def _freeze(value: Any) -> Any:
    """Nested mappings -> FrozenDict and lists -> tuples, so Module fields stay hashable."""
    if isinstance(value, Mapping):
        return flax.core.FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


# Blocks whose combined decision out["logits"] is the ITM classifier (decision-level fusion: no itm_head).
_DECISION_BLOCKS = (fusion_lib.LateFusion, fusion_lib.HybridFusion)


def _mixes(block: nn.Module, stream: str) -> bool:
    """Whether `block`'s output tokens for the modality `stream` depend on another modality."""
    if isinstance(block, (fusion_lib.ConcatFusion, fusion_lib.CoAttention, fusion_lib.SymmetricCrossAttention)):
        return block.depth > 0
    if isinstance(block, fusion_lib.CrossModalAttention):
        return block.query == stream and block.depth > 0
    if isinstance(block, fusion_lib.BottleneckFusion):
        return block.fusion_layer <= block.depth - 2
    # SharedWeightsFusion (separate passes through one encoder), pooling-only blocks (concat_mlp, late, hybrid,
    # ...: their text tokens are the text tower's own), unknown blocks: no.
    return False


class FusionModel(nn.Module):
    """Towers (from `towers`) + a named fusion block + MLM/ITM heads (see the module docstring)."""

    towers: Mapping[str, Mapping[str, Any]]  # modality -> {"kind": a towers.TOWERS name, **that Module's fields}
    fusion: str = "concat"  # a fusion.FUSION_BLOCKS name
    fusion_args: Mapping[str, Any] = flax.core.FrozenDict()  # that block's fields (width defaults to text width)
    mlm_head: bool = True
    itm_head: bool = True
    vqa_labels: Optional[int] = None  # an answer classifier (VQA) on the pooled output with this many answers
    # Masked patch prediction (ViLT's MPP): the image tower (a ViT) gets a [MASK] patch, and a head regresses the
    # masked patches' pixels from the image tokens the model returns.
    mpp_head: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (layers.remat)
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
    scan_layers: bool = False  # nn.scan over the towers' encoder layers (params stacked under */encoder/layers)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        # Freeze the dicts so the Module stays hashable (jit static args, flax's module caching).
        for key in ("towers", "fusion_args"):
            object.__setattr__(self, key, _freeze(getattr(self, key)))
        super().__post_init__()

    # ------------------------------------------------------------------------------------------- config

    def _shared(self, cls: type[nn.Module], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """kwargs with the model's dtype/param_dtype, remat turned on if asked here, and the model's remat_policy
        unless kwargs name one (remat / remat_policy only when cls has them)."""
        out = {**dict(kwargs), "dtype": self.dtype, "param_dtype": self.param_dtype}
        fields = cls.__dataclass_fields__
        if "remat" in fields:
            out["remat"] = bool(self.remat or kwargs.get("remat", False))
        if "remat_policy" in fields:
            out["remat_policy"] = kwargs.get("remat_policy", self.remat_policy)
        # Like remat: on here turns them on everywhere they exist; a sub-config may still turn them on by itself.
        if "attention" in fields and self.attention != "einsum":
            out["attention"] = self.attention
        if "scan_layers" in fields:
            out["scan_layers"] = bool(self.scan_layers or kwargs.get("scan_layers", False))
        return out

    def tower(self, modality: str) -> tuple[TowerKind, dict[str, Any]]:
        """(registry entry, Module kwargs without `kind`) of one tower, as configured (no dtype/remat overrides)."""
        fields = dict(self.towers[modality])
        kind = tower_kind(fields.pop("kind", None), f"FusionModel.towers[{modality!r}]")
        if self.mpp_head and modality == IMAGE:
            fields["mask_token"] = True  # the MPP head's [MASK] patch lives in the ViT
        return kind, fields

    @property
    def patch_size(self) -> int:
        """The image tower's patch size (masked patch prediction's targets are its patches)."""
        kind, fields = self.tower(IMAGE)
        return int(field_value(kind.module, fields, "patch_size"))

    @property
    def text_width(self) -> int:
        """Width D_txt of the text tower's tokens (and of its word table)."""
        if TEXT not in self.towers:
            raise ValueError(f"FusionModel has no {TEXT!r} tower; towers: {sorted(self.towers)}")
        kind, fields = self.tower(TEXT)
        return field_value(kind.module, fields, "width")

    def _default_width(self) -> int:
        """The fusion block's default width: the text tower's, else the first tower's."""
        if TEXT in self.towers:
            return self.text_width
        if not self.towers:
            raise ValueError("FusionModel needs at least one tower in `towers`")
        kind, fields = self.tower(next(iter(self.towers)))
        return field_value(kind.module, fields, "width")

    def fusion_kwargs(self) -> dict[str, Any]:
        """The fusion block's kwargs: fusion_args + defaults (width = text width; late/hybrid: num_classes = 2)."""
        cls = fusion_lib.FUSION_BLOCKS.get(self.fusion)
        kwargs = dict(self.fusion_args)
        if cls is None:
            fusion_lib.build_fusion(self.fusion, **kwargs)  # raises, listing the known names
        valid = set(cls.__dataclass_fields__) - {"parent", "name"}
        if set(kwargs) - valid:
            try:
                fusion_lib.build_fusion(self.fusion, **kwargs)
            except ValueError as e:
                # Typically fusion= changed alone, leaving the previous block's fields in fusion_args.
                raise ValueError(f"{e} (fusion_args must hold the fields of fusion block {self.fusion!r}; "
                                 f"configs/fusion.py:block={self.fusion} sets the block and its fields together)"
                                 ) from None
        kwargs.setdefault("width", self._default_width())
        if issubclass(cls, _DECISION_BLOCKS):
            kwargs.setdefault("num_classes", 2)
            if self.itm_head and kwargs["num_classes"] != 2:
                raise ValueError(f"itm_head uses the {self.fusion} block's combined logits as itm_logits, so it "
                                 f"needs num_classes=2; got fusion_args.num_classes={kwargs['num_classes']}")
        return self._shared(cls, kwargs)

    def _block(self, **module_kwargs: Any) -> nn.Module:
        """The fusion block (parent=None: a detached copy for inspection; name=...: a child inside compact)."""
        return fusion_lib.FUSION_BLOCKS[self.fusion](**self.fusion_kwargs(), **module_kwargs)

    @property
    def required_keys(self) -> tuple[str, ...]:
        """Batch keys the towers need, in tower order."""
        keys: list[str] = []
        for modality in self.towers:
            keys += [k for k in self.tower(modality)[0].inputs if k not in keys]
        return tuple(keys)

    @property
    def image_cls_first(self) -> bool:
        """True iff image_tokens[:, 0] is the image tower's cls token (word-patch alignment leaves it out)."""
        if "image" not in self.towers:
            return False
        kind, fields = self.tower("image")
        return bool(kind.cls_first(fields)) if kind.cls_first is not None else False

    def fused(self, modality: str) -> bool:
        """True iff the returned `{modality}_tokens` depend on another modality."""
        return _mixes(self._block(parent=None), modality)

    @property
    def fused_text(self) -> bool:
        """True iff the text tokens feeding the MLM head depend on the image (else MLM is text-only)."""
        return self.fused(TEXT)

    @property
    def fused_image(self) -> bool:
        """True iff the returned image_tokens depend on the text."""
        return self.fused("image")

    # ------------------------------------------------------------------------------------------ forward

    @nn.compact
    def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        """batch (the towers' keys: image [B,H,W,C], text_ids [B,L], text_mask [B,L], optional text_type_ids) ->
        {pooled, {modality}_tokens, {modality}_mask for towers without a mask key (image_mask), and with the heads
        on: itm_logits [B,2], mlm_logits [B,L,V]}."""
        if not self.towers:
            raise ValueError("FusionModel needs at least one tower in `towers`")
        for key in self.required_keys:
            if key not in batch:
                raise KeyError(f"FusionModel needs batch key {key!r}; got keys {sorted(batch)}")
        if self.mpp_head and (IMAGE not in self.towers or self.tower(IMAGE)[0].module.__name__ != "ViT"):
            raise ValueError(f"mpp_head needs an {IMAGE!r} tower of kind 'vit'; towers: {sorted(self.towers)}")
        if self.mlm_head and (TEXT not in self.towers or self.tower(TEXT)[0].word_table is None):
            raise ValueError(f"mlm_head needs a {TEXT!r} tower whose kind has a word table (kind 'text'); "
                             f"towers: {sorted(self.towers)}")

        names = tuple(self.towers)
        encoders, tokens, masks = {}, {}, {}
        for m in names:
            kind, fields = self.tower(m)
            encoders[m] = kind.module(**self._shared(kind.module, fields), name=f"{m}_encoder")
            tokens[m], masks[m] = kind.encode(encoders[m], batch, train)
        sizes = {m: tokens[m].shape[0] for m in names}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch sizes differ across towers: {sizes}")

        block = self._block(name="fusion")
        out = block(tokens, masks, train=train)

        lengths = {m: tokens[m].shape[1] for m in names}
        if out.get("streams") is not None and all(m in out["streams"] for m in names):
            fused = {m: out["streams"][m] for m in names}
        elif out.get("sequence") is not None and out["sequence"].shape[1] == sum(lengths.values()):
            # A concatenation of every stream without per-stream outputs: split it in the block's modality order.
            order = tuple(block.modalities) if block.modalities is not None else tuple(sorted(names))
            fused, offset = {}, 0
            for m in order:
                fused[m] = out["sequence"][:, offset:offset + lengths[m]]
                offset += lengths[m]
        else:
            # Pooling-only block: the encoders' own tokens (MLM is then text-only).
            fused = tokens
        extras = {k: v for k, v in out.items() if k not in ("sequence", "mask", "pooled", "streams")}
        if extras:
            self.sow("intermediates", "fusion_extras", extras)  # gates, per-modality logits, ... for analyses

        pooled = out["pooled"]
        result = {"pooled": layers.constrain(pooled, layers.POOLED_AXES)}
        for m in names:
            result[f"{m}_tokens"] = layers.constrain(fused[m])
            if self.tower(m)[0].mask_input is None:  # the batch does not carry this mask already
                result[f"{m}_mask"] = masks[m]
        if self.vqa_labels is not None:
            answers = heads.AnswerClassifier(self.vqa_labels, dtype=self.dtype, param_dtype=self.param_dtype,
                                             name="vqa_head")
            result["vqa_logits"] = answers(pooled).astype(jnp.float32)
        if self.itm_head:
            if isinstance(block, _DECISION_BLOCKS):
                result["itm_logits"] = out["logits"].astype(jnp.float32)  # decision-level fusion: the block's own
            else:
                result["itm_logits"] = heads.itm_logits(pooled, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.mlm_head:
            result["mlm_logits"] = self._mlm(fused[TEXT], encoders[TEXT])
        if self.mpp_head:
            patches = fused[IMAGE][:, 1:] if self.image_cls_first else fused[IMAGE]
            p, channels = self.patch_size, batch["image"].shape[-1]
            kind, fields = self.tower(IMAGE)
            result["mpp_pred"] = heads.token_prediction(
                patches, p * p * channels, prefix="mpp", activation=field_value(kind.module, fields, "activation"),
                ln_epsilon=field_value(kind.module, fields, "ln_epsilon"), dtype=self.dtype,
                param_dtype=self.param_dtype)
            # Every patch is kept (no patch dropping as ViLT's max_image_len): targets are in raster order.
            result["patch_index"] = jnp.broadcast_to(jnp.arange(patches.shape[1]), patches.shape[:2])
        return result

    def _mlm(self, text_tokens: Array, text_encoder: nn.Module) -> Array:
        """HeadTransform -> decoder tied to the text tower's word table [V, D_txt] (+ bias) -> float32."""
        kind, fields = self.tower(TEXT)
        x = text_tokens
        d_txt = self.text_width
        if x.shape[-1] != d_txt:
            # Fused tokens of another width: map them back to the embedding table's width first.
            x = layers.Dense(d_txt, dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=partitioned(layers.dense_init, (None, "embed")),
                             bias_init=partitioned(layers.zeros_init, ("embed",)), name="mlm_proj")(x)
        # Tied decoder (BERT/ViLT): the table is the text tower's own parameter, read through its scope, so its
        # gradient sums the embedding and decoder uses.
        return heads.tied_mlm_logits(self, x, kind.word_table(text_encoder),
                                     activation=field_value(kind.module, fields, "activation"),
                                     ln_epsilon=field_value(kind.module, fields, "ln_epsilon"), dtype=self.dtype,
                                     param_dtype=self.param_dtype)


__all__ = ["FusionModel"]
