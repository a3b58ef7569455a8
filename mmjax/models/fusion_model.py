"""FusionModel: any ViT image encoder + any text encoder + any `fusion` block + MLM / ITM heads.

Data flow (B batch, N image tokens, L text positions, V vocabulary):

    image [B, H, W, C] --ViT--------------> image tokens [B, N, D_img]  (every token, incl. a cls token if any;
                                                                          image mask = all ones [B, N])
    text_ids, text_mask [B, L] --TextTransformer--> text tokens [B, L, D_txt]
    out = fusion_block({"image": image tokens, "text": text tokens}, {"image": ones, "text": text_mask})
    pooled      [B, width]   = out["pooled"]
    itm_logits  [B, 2]       = Dense(2)(pooled)            ("late" block: its fused decision out["logits"])
    text_tokens / image_tokens: see the table below
    mlm_logits  [B, L, V]    = HeadTransform(text_tokens) @ token_embedding.T + mlm_bias
                               (decoder tied to the text tower's `token_embedding` table; when text_tokens are
                               not D_txt wide a Dense `mlm_proj` first maps them to D_txt; HeadTransform uses
                               the text tower's activation and ln_epsilon)

`width` (the fusion block's) defaults to the text tower's width. Head outputs (itm_logits, mlm_logits) are
float32; everything else is in `dtype`.

Where text_tokens / image_tokens come from, and whether the text tokens (hence MLM) can see the image
(`FusionModel.fused_text`; `fused_image` likewise for the image tokens):

    block                 tokens from (width)                   fused_text (text tokens depend on the image)
    concat                out["streams"] = fused sequence split  yes if depth > 0 (depth 0: typed concat only)
    cross_attention       out["streams"] (width)                 yes if query == "text" and depth > 0; the
                                                                 non-query stream is only projected to width
    co_attention          out["streams"] (width)                 yes if depth > 0
    bottleneck            out["streams"] (width)                 only if fusion_layer <= depth - 2: a stream
                                                                 reads the bottleneck the *previous* layer
                                                                 averaged, so depth 1 never mixes into tokens
    shared_weights        out["streams"] (width)                 no: one shared encoder runs each modality
                                                                 separately
    sum, multiplicative_gated, additive_gated, late
                          the encoders' own (D_img, D_txt)       no (pooling-only blocks)

A block that returns no streams but a `sequence` concatenating both modalities (N + L long) is split back by
modality order. Where fused_text is False the MLM objective is TEXT-ONLY masked language modelling: the masked
words are predicted from the caption alone, and only ITM (through `pooled`) trains the cross-modal part.

Every parameter carries logical axis names (see `layers`). `dtype` and `param_dtype` override the same keys in
`image`, `text` and `fusion_args`; `remat=True` turns rematerialisation on in both towers and the block (a
sub-config may also turn it on by itself). The block's extra outputs (gates, per-modality logits, bottleneck, ...)
are sown as intermediates["fusion_extras"] (apply with mutable=["intermediates"] to read them).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import fusion as fusion_lib
from mmjax.models import layers
from mmjax.models.layers import Array, Dtype, partitioned
from mmjax.models.text import TextTransformer
from mmjax.models.vilt import tied_mlm_logits
from mmjax.models.vit import ViT

REQUIRED_KEYS = ("image", "text_ids", "text_mask")
MODALITIES = ("image", "text")


def _freeze(value: Any) -> Any:
    """Nested mappings -> FrozenDict and lists -> tuples, so Module fields stay hashable."""
    if isinstance(value, Mapping):
        return flax.core.FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _field(cls: type[nn.Module], kwargs: Mapping[str, Any], name: str) -> Any:
    """kwargs[name] if given, else the dataclass default of `cls.name`."""
    return kwargs[name] if name in kwargs else cls.__dataclass_fields__[name].default


def _mixes(block: nn.Module, stream: str) -> bool:
    """Whether `block`'s output tokens for `stream` ("image" | "text") depend on the other modality."""
    if isinstance(block, (fusion_lib.ConcatFusion, fusion_lib.CoAttention)):
        return block.depth > 0
    if isinstance(block, fusion_lib.CrossModalAttention):
        return block.query == stream and block.depth > 0
    if isinstance(block, fusion_lib.BottleneckFusion):
        return block.fusion_layer <= block.depth - 2
    # SharedWeightsFusion (separate passes through one encoder), pooling-only blocks, unknown blocks: no.
    return False


class FusionModel(nn.Module):
    """Image tower + text tower + a named fusion block + MLM/ITM heads (see the module docstring)."""

    image: Mapping[str, Any]  # ViT kwargs
    text: Mapping[str, Any]  # TextTransformer kwargs (causal=False for masked LM)
    fusion: str = "concat"  # a fusion.FUSION_BLOCKS name
    fusion_args: Mapping[str, Any] = flax.core.FrozenDict()  # that block's fields (width defaults to text width)
    mlm_head: bool = True
    itm_head: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        # Freeze the dicts so the Module stays hashable (jit static args, flax's module caching).
        for key in ("image", "text", "fusion_args"):
            object.__setattr__(self, key, _freeze(getattr(self, key)))
        super().__post_init__()

    # ------------------------------------------------------------------------------------------- config

    def _shared(self, cls: type[nn.Module], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """kwargs with the model's dtype/param_dtype, and remat turned on if asked here (when cls has it)."""
        out = {**dict(kwargs), "dtype": self.dtype, "param_dtype": self.param_dtype}
        if "remat" in cls.__dataclass_fields__:
            out["remat"] = bool(self.remat or kwargs.get("remat", False))
        return out

    @property
    def text_width(self) -> int:
        """Width D_txt of the text tower's tokens (and of its token-embedding table)."""
        return _field(TextTransformer, self.text, "width")

    def fusion_kwargs(self) -> dict[str, Any]:
        """The fusion block's kwargs: fusion_args + defaults (width = text width; late: num_classes = 2)."""
        cls = fusion_lib.FUSION_BLOCKS.get(self.fusion)
        kwargs = dict(self.fusion_args)
        valid = set(cls.__dataclass_fields__) - {"parent", "name"} if cls is not None else set()
        if cls is None or set(kwargs) - valid:
            fusion_lib.build_fusion(self.fusion, **kwargs)  # raises, listing the known names / fields
        kwargs.setdefault("width", self.text_width)
        if issubclass(cls, fusion_lib.LateFusion):
            kwargs.setdefault("num_classes", 2)
            if self.itm_head and kwargs["num_classes"] != 2:
                raise ValueError(f"itm_head uses the late block's fused logits as itm_logits, so it needs "
                                 f"num_classes=2; got fusion_args.num_classes={kwargs['num_classes']}")
        return self._shared(cls, kwargs)

    def _block(self, **module_kwargs: Any) -> nn.Module:
        """The fusion block (parent=None: a detached copy for inspection; name=...: a child inside compact)."""
        return fusion_lib.FUSION_BLOCKS[self.fusion](**self.fusion_kwargs(), **module_kwargs)

    @property
    def image_cls_first(self) -> bool:
        """True iff image_tokens[:, 0] is the ViT's cls token (word-patch alignment leaves it out)."""
        pool = _field(ViT, self.image, "pool")
        cls_token = _field(ViT, self.image, "cls_token")
        return pool == "cls" if cls_token is None else bool(cls_token)

    @property
    def fused_text(self) -> bool:
        """True iff the text tokens feeding the MLM head depend on the image (else MLM is text-only)."""
        return _mixes(self._block(parent=None), "text")

    @property
    def fused_image(self) -> bool:
        """True iff the returned image_tokens depend on the text."""
        return _mixes(self._block(parent=None), "image")

    # ------------------------------------------------------------------------------------------ forward

    @nn.compact
    def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        """batch {image [B,H,W,C], text_ids [B,L], text_mask [B,L] (+ optional text_type_ids)} -> {pooled,
        text_tokens, image_tokens, image_mask, and with the heads on: itm_logits [B,2], mlm_logits [B,L,V]}."""
        for key in REQUIRED_KEYS:
            if key not in batch:
                raise KeyError(f"FusionModel needs batch key {key!r}; got keys {sorted(batch)}")
        text_ids, text_mask = batch["text_ids"], batch["text_mask"]
        if text_ids.ndim != 2 or text_mask.shape != text_ids.shape:
            raise ValueError(f"text_ids and text_mask must both be [B, L]; got {text_ids.shape} and "
                             f"{text_mask.shape}")
        text_mask = (jnp.asarray(text_mask) > 0).astype(jnp.int32)

        _, img = ViT(**self._shared(ViT, self.image), name="image_encoder")(batch["image"], train=train)
        text_encoder = TextTransformer(**self._shared(TextTransformer, self.text), name="text_encoder")
        _, txt = text_encoder(text_ids, text_mask, batch.get("text_type_ids"), train=train)
        b, n, length = img.shape[0], img.shape[1], txt.shape[1]
        if text_ids.shape[0] != b:
            raise ValueError(f"image batch {b} != text batch {text_ids.shape[0]}")
        image_mask = jnp.ones((b, n), jnp.int32)

        block = self._block(name="fusion")
        out = block({"image": img, "text": txt}, {"image": image_mask, "text": text_mask}, train=train)

        if out.get("streams") is not None and all(m in out["streams"] for m in MODALITIES):
            image_tokens, text_tokens = out["streams"]["image"], out["streams"]["text"]
        elif out.get("sequence") is not None and out["sequence"].shape[1] == n + length:
            # A concatenation of both streams without per-stream outputs: split it in the block's modality order.
            order = tuple(block.modalities) if block.modalities is not None else tuple(sorted(MODALITIES))
            sizes = {"image": n, "text": length}
            offsets = {m: sum(sizes[o] for o in order[: order.index(m)]) for m in MODALITIES}
            image_tokens = out["sequence"][:, offsets["image"]:offsets["image"] + n]
            text_tokens = out["sequence"][:, offsets["text"]:offsets["text"] + length]
        else:
            # Pooling-only block: the encoders' own tokens (MLM is then text-only).
            image_tokens, text_tokens = img, txt
        extras = {k: v for k, v in out.items() if k not in ("sequence", "mask", "pooled", "streams")}
        if extras:
            self.sow("intermediates", "fusion_extras", extras)  # gates, per-modality logits, ... for analyses

        pooled = out["pooled"]
        result = {
            "pooled": layers.constrain(pooled, ("batch", "embed")),
            "text_tokens": layers.constrain(text_tokens),
            "image_tokens": layers.constrain(image_tokens),
            "image_mask": image_mask,
        }
        if self.itm_head:
            if isinstance(block, fusion_lib.LateFusion):
                itm = out["logits"]  # decision-level fusion: the block's own 2-way fused logits
            else:
                itm = layers.Dense(2, dtype=self.dtype, param_dtype=self.param_dtype,
                                   kernel_init=partitioned(layers.dense_init, ("embed", None)),
                                   bias_init=partitioned(layers.zeros_init, (None,)), name="itm_head")(pooled)
            result["itm_logits"] = itm.astype(jnp.float32)
        if self.mlm_head:
            result["mlm_logits"] = self._mlm(text_tokens, text_encoder)
        return result

    def _mlm(self, text_tokens: Array, text_encoder: TextTransformer) -> Array:
        """HeadTransform -> decoder tied to the text tower's token_embedding [V, D_txt] (+ bias) -> float32."""
        x = text_tokens
        d_txt = self.text_width
        if x.shape[-1] != d_txt:
            # Fused tokens of another width: map them back to the embedding table's width first.
            x = layers.Dense(d_txt, dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=partitioned(layers.dense_init, (None, "embed")),
                             bias_init=partitioned(layers.zeros_init, ("embed",)), name="mlm_proj")(x)
        # Tied decoder (BERT/ViLT): the table is the text tower's own parameter, read through its scope (boxed
        # at init, plain or boxed in apply), so its gradient sums the embedding and decoder uses.
        table = nn.unbox(text_encoder.variables["params"]["token_embedding"])
        return tied_mlm_logits(self, x, table, activation=_field(TextTransformer, self.text, "activation"),
                               ln_epsilon=_field(TextTransformer, self.text, "ln_epsilon"), dtype=self.dtype,
                               param_dtype=self.param_dtype)


__all__ = ["FusionModel", "REQUIRED_KEYS"]
