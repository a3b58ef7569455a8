"""Multimodal fusion blocks: one calling convention, interchangeable by name (`build_fusion("concat", ...)`).

Calling convention (every block):

    out = block(streams, masks, *, train=False)

    streams  Mapping[str, Array]  modality name -> tokens [B, L_m, D_m]   (e.g. {"image": ..., "text": ...})
    masks    Mapping[str, Array]  modality name -> int/bool [B, L_m], 1 = real token, 0 = padding.
                                  A modality missing from `masks` has no padding (all ones).
    train    bool                 enables dropout (then apply needs a "dropout" rng)

    out["sequence"]  [B, L, width]  fused tokens (modalities concatenated in modality order); None for blocks that
                                    only pool
    out["mask"]      [B, L] int32   mask of out["sequence"] (1 = real); None when sequence is None
    out["pooled"]    [B, width]     one fused vector per example
    out["streams"]   {name: [B, L_m, width]}  per-modality token outputs of stream-keeping blocks; None otherwise
    (+ block-specific extras: "gates", "logits", "fused_logits", "modality_logits", "modality_weights",
       "decision_weights", "modality_pooled", "bottleneck")

Blocks (FUSION_BLOCKS name: class; what it returns besides pooled):

    concat                     ConcatFusion               sequence + streams (typed concatenation [+ Encoder])
    sum                        SumFusion                  pooled only; modality_pooled
    multiplicative_gated       MultiplicativeGatedFusion  pooled only; gates (two modalities)
    additive_gated             AdditiveGatedFusion        pooled only; gates (two modalities)
    concat_mlp                 ConcatMLPFusion            pooled only (MLP over the concatenated pooled vectors)
    cross_attention            CrossModalAttention        sequence = the query stream; streams
    co_attention               CoAttention                sequence + streams (two modalities)
    symmetric_cross_attention  SymmetricCrossAttention    sequence + streams (every stream attends to all others)
    bottleneck                 BottleneckFusion           sequence + streams; bottleneck
    late                       LateFusion                 pooled only; logits, modality_logits, modality_weights
    hybrid                     HybridFusion               pooled only; logits, fused_logits, modality_logits,
                                                          decision_weights
    shared_weights             SharedWeightsFusion        sequence + streams (one encoder, separate passes)

Modality order is `modalities` when that field is set (every listed stream must be present, no other may be), else
the sorted stream names. The order fixes the concatenation order of out["sequence"] and which stream is "first".

Masks are honoured everywhere: pooling is a masked mean (or the first token, `pool="first"`, for a leading cls
token), attention over keys uses the additive `layers.padding_bias`, and padded positions never influence real
ones. Padded output positions hold unspecified values.

Widths: a modality whose D_m differs from `width` is first projected by its own Dense `proj_<name>`; streams
already `width` wide are used as they are (so e.g. SumFusion of equal-width vectors has no parameters).

Parameters carry the logical axis names of `layers` (embed, mlp, heads, kv, length). Flax forbids one logical
name twice in one array, so width -> width kernels (projections, gates) are (None, "embed"): the output side
is sharded like every other "embed" dim, the input side is left whole.
"""
from __future__ import annotations

import difflib
import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.layers import Array, CrossAttentionLayer, Dtype, masked_mean, partitioned

Streams = Mapping[str, Array]
Output = dict[str, Any]

POOLS = ("mean", "first")
WEIGHTINGS = ("mean", "learned")  # how decision-level blocks (late, hybrid) combine their decisions


# ------------------------------------------------------------------------------------------------------ helpers


def pool_tokens(x: Array, mask: Array, how: str) -> Array:
    """x [B, L, D] -> [B, D] by masked mean ("mean") or the first token ("first", e.g. a cls token)."""
    if how == "mean":
        return masked_mean(x, mask)
    if how == "first":
        return x[:, 0]
    raise ValueError(f"pool must be one of {POOLS}; got {how!r}")


def squashed_sigmoid(z: Array, eps: float) -> Array:
    """sigmoid(z) mapped affinely into [eps, 1 - eps], computed in float32.

    A plain float32 sigmoid rounds to exactly 0 or 1 once |z| > ~17 (large-magnitude inputs), which silences a
    modality completely and makes log(gate) infinite; the affine squash keeps gates strictly inside (0, 1) and,
    unlike clipping, keeps the sigmoid's gradient.
    """
    return eps + (1.0 - 2.0 * eps) * jax.nn.sigmoid(z.astype(jnp.float32))


def _dense(features: int, names: tuple[Optional[str], Optional[str]], dtype: Dtype, param_dtype: Dtype,
           name: str) -> layers.Dense:
    """layers.Dense with logically named kernel `names` and bias `(names[1],)`."""
    return layers.Dense(features, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=partitioned(layers.dense_init, names),
                        bias_init=partitioned(layers.zeros_init, (names[1],)), name=name)


def _decision_weights(owner: nn.Module, count: int, weighting: str, param_name: str, param_dtype: Dtype) -> Array:
    """[count] float32 convex weights: uniform ("mean") or softmax of a zero-initialised parameter `param_name` of
    `owner` ("learned"; zero init = the mean). Call from inside `owner`'s compact method."""
    if weighting == "mean":
        return jnp.full((count,), 1.0 / count, jnp.float32)
    # Softmax keeps the combination convex (weights positive, summing to 1) whatever the parameter learns.
    w = owner.param(param_name, partitioned(layers.zeros_init, (None,)), (count,), param_dtype)
    return jax.nn.softmax(w.astype(jnp.float32))


def _weighted_sum(weights: Array, parts: Sequence[Array], dtype: Dtype) -> Array:
    """sum_k weights[k] * parts[k] over same-shaped [B, D] parts, accumulated in float32, cast to dtype."""
    return jnp.einsum("m,mbd->bd", weights, jnp.stack(parts).astype(jnp.float32)).astype(dtype)


# ------------------------------------------------------------------------------------------------ base classes


class _Fusion(nn.Module):
    """Fields and input handling shared by every fusion block (not itself a block)."""

    width: int = 768
    modalities: Optional[tuple[str, ...]] = None  # order; default sorted(streams)
    pool: str = "mean"  # "mean" (masked) | "first" (leading cls token)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _prepare(self, streams: Streams, masks: Optional[Mapping[str, Array]]
                 ) -> tuple[tuple[str, ...], dict[str, Array], dict[str, Array]]:
        """Validated (names in modality order, tokens cast to dtype, int32 masks [B, L_m])."""
        masks = masks or {}
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}; got {self.pool!r}")
        if self.modalities is None:
            names = tuple(sorted(streams))
        else:
            names = tuple(self.modalities)
            missing = [n for n in names if n not in streams]
            extra = [n for n in streams if n not in names]
            if missing or extra:
                raise ValueError(f"{type(self).__name__}: modalities={names} but streams have {sorted(streams)} "
                                 f"(missing {missing}, unexpected {extra})")
        if not names:
            raise ValueError(f"{type(self).__name__}: no input streams")
        unknown = [n for n in masks if n not in streams]
        if unknown:
            raise ValueError(f"{type(self).__name__}: masks for unknown streams {unknown}; streams: {sorted(streams)}")
        xs, ms = {}, {}
        for n in names:
            x = jnp.asarray(streams[n])
            if x.ndim != 3:
                raise ValueError(f"stream {n!r} must be [B, L, D]; got shape {x.shape}")
            m = masks.get(n)
            m = jnp.ones(x.shape[:2], jnp.int32) if m is None else (jnp.asarray(m) > 0).astype(jnp.int32)
            if m.shape != x.shape[:2]:
                raise ValueError(f"mask {n!r} has shape {m.shape}; its stream needs {x.shape[:2]}")
            xs[n], ms[n] = x.astype(self.dtype), m
        return names, xs, ms

    def _to_width(self, x: Array, name: str) -> Array:
        """Projects [..., D_m] to [..., width] with Dense `proj_<name>` unless D_m == width already."""
        if x.shape[-1] == self.width:
            return x
        return _dense(self.width, (None, "embed"), self.dtype, self.param_dtype, f"proj_{name}")(x)

    def _type_embedding(self, name: str) -> Array:
        """Learned modality-type embedding [width] for stream `name` (one parameter per name, so subsets of the
        modalities and any order find the same vector)."""
        emb = self.param(f"type_embedding_{name}", partitioned(layers.embed_init, ("embed",)), (self.width,),
                         self.param_dtype)
        return emb.astype(self.dtype)

    def _pooled_vectors(self, names: Sequence[str], xs: Mapping[str, Array], ms: Mapping[str, Array]
                        ) -> dict[str, Array]:
        """Per-modality pooled vectors projected to width: {name: [B, width]} (pool, then project: cheaper)."""
        return {n: layers.constrain(self._to_width(pool_tokens(xs[n], ms[n], self.pool), n), layers.POOLED_AXES)
                for n in names}


class _TransformerFusion(_Fusion):
    """Adds the transformer-layer fields (not itself a block)."""

    depth: int = 1
    num_heads: int = 12
    mlp_dim: Optional[int] = None  # default 4 * width
    norm: str = "pre"  # "pre" (ViT/CLIP) | "post" (BERT/ViLT/ViLBERT)
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    ln_epsilon: float = 1e-6
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (layers.remat)
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"

    @property
    def _mlp_dim(self) -> int:
        return self.mlp_dim or 4 * self.width

    def _remat(self, cls: type[nn.Module], deterministic_argnum: int) -> type[nn.Module]:
        """`cls` rematerialised per remat / remat_policy (layers.remat); the argnum of `deterministic` counts
        `self` as 0."""
        return layers.remat(cls, self.remat, self.remat_policy, static_argnums=(deterministic_argnum,))

    def _layer_kwargs(self) -> dict[str, Any]:
        """Fields shared by every Block / CrossAttentionLayer of the block."""
        return dict(num_heads=self.num_heads, mlp_dim=self._mlp_dim, norm=self.norm, activation=self.activation,
                    dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
                    ln_epsilon=self.ln_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                    attention=self.attention)

    def _encoder(self, depth: int, name: str) -> layers.Encoder:
        return layers.Encoder(depth=depth, remat=self.remat, remat_policy=self.remat_policy, **self._layer_kwargs(),
                              name=name)

    def _final_ln(self, x: Array, name: str) -> Array:
        """Pre-norm stacks end un-normalised (layers.Encoder leaves the final LN to its owner); post-norm ones
        already end in a LayerNorm."""
        if self.norm == "pre" and self.depth > 0:
            x = layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name=name)(x)
        return x


class _ConcatMLP(_Fusion):
    """Adds the concatenate-then-MLP early fusion shared by concat_mlp and hybrid (not itself a block)."""

    hidden: int = 1  # hidden layers before the output Dense(width); 0: a single Dense (Linear(768 + 768, 768))
    hidden_dim: Optional[int] = None  # default width
    activation: str = "relu"  # a layers.ACTIVATIONS name (MMF's concat MLPs use ReLU)
    dropout_rate: float = 0.0  # after each hidden activation

    def _concat_mlp(self, names: Sequence[str], xs: Mapping[str, Array], ms: Mapping[str, Array],
                    train: bool) -> Array:
        """[pool(x_1); ...; pool(x_M)] (each at its own width D_m, modality order) -> `hidden` x (Dense(hidden_dim)
        -> activation -> dropout) -> Dense(width) `out` -> [B, width]."""
        if self.hidden < 0:
            raise ValueError(f"hidden must be >= 0 (number of hidden layers); got {self.hidden}")
        act = layers.get_activation(self.activation)
        # No per-modality projection first: the first Dense sees every modality at its own width, as
        # Linear(D_img + D_txt, width) does, and a projection before it would only add a second linear map.
        h = jnp.concatenate([pool_tokens(xs[n], ms[n], self.pool) for n in names], axis=-1)
        for i in range(self.hidden):
            h = _dense(self.hidden_dim or self.width, (None, "mlp"), self.dtype, self.param_dtype, f"hidden_{i}")(h)
            h = nn.Dropout(self.dropout_rate)(act(h), deterministic=not train)
        in_name = "mlp" if self.hidden > 0 else None
        return _dense(self.width, (in_name, "embed"), self.dtype, self.param_dtype, "out")(h)


def _out(sequence: Optional[Array], mask: Optional[Array], pooled: Array, streams: Optional[dict[str, Array]],
         **extras: Any) -> Output:
    """The common output dict (see the module docstring)."""
    return dict(sequence=sequence, mask=mask, pooled=layers.constrain(pooled, layers.POOLED_AXES), streams=streams,
                **extras)


def _concat(names: Sequence[str], xs: Mapping[str, Array], ms: Mapping[str, Array]) -> tuple[Array, Array]:
    """Concatenates streams and masks along length in `names` order."""
    return (jnp.concatenate([xs[n] for n in names], axis=1), jnp.concatenate([ms[n] for n in names], axis=1))


def _split(x: Array, names: Sequence[str], lengths: Sequence[int]) -> dict[str, Array]:
    """Inverse of `_concat` for the tokens: {name: x[:, offset:offset + L_name]}."""
    out, offset = {}, 0
    for n, length in zip(names, lengths):
        out[n] = x[:, offset:offset + length]
        offset += length
    return out


# -------------------------------------------------------------------------------------------------- the blocks


class ConcatFusion(_TransformerFusion):
    """Single-stream fusion (ViLT/UNITER): project to width, + modality-type embedding, concatenate along length,
    then an Encoder of `depth` layers (depth=0: concatenation only). Keeps streams (the fused sequence split back).
    For ViLT's [text; image] order set modalities=("text", "image") (and pool="first" for its text cls token)."""

    depth: int = 0  # unlike the other transformer blocks: plain concatenation unless asked

    @nn.compact
    def __call__(self, streams: Streams, masks: Mapping[str, Array], *, train: bool = False) -> Output:
        """See the module docstring; pooled = masked mean or first token of the fused sequence."""
        names, xs, ms = self._prepare(streams, masks)
        xs = {n: self._to_width(xs[n], n) + self._type_embedding(n) for n in names}
        x, mask = _concat(names, xs, ms)
        x = nn.Dropout(self.dropout_rate)(layers.constrain(x), deterministic=not train)
        if self.depth > 0:
            x = self._encoder(self.depth, "encoder")(x, layers.padding_bias(mask), not train)
            x = self._final_ln(x, "ln_final")
        x = layers.constrain(x)
        split = _split(x, names, [xs[n].shape[1] for n in names])
        return _out(x, mask, pool_tokens(x, mask, self.pool), split)


class SumFusion(_Fusion):
    """Element-wise sum of the modalities' pooled vectors (each masked-mean pooled, projected to width)."""

    @nn.compact
    def __call__(self, streams: Streams, masks: Mapping[str, Array], *, train: bool = False) -> Output:
        """See the module docstring; pooled-only (sequence/streams None), plus out["modality_pooled"]."""
        del train  # no dropout: nothing stochastic here
        names, xs, ms = self._prepare(streams, masks)
        vecs = self._pooled_vectors(names, xs, ms)
        pooled = functools.reduce(jnp.add, [vecs[n] for n in names])
        return _out(None, None, pooled, None, modality_pooled=vecs)


class _GatedFusion(_Fusion):
    """Two-modality pooled fusion with sigmoid gates (not itself a block)."""

    gate_eps: float = 1e-6  # gates lie in [eps, 1 - eps], strictly inside (0, 1); see squashed_sigmoid

    def _two(self, streams: Streams, masks: Mapping[str, Array]) -> tuple[tuple[str, str], Array, Array, Array]:
        """(names, x1, x2, [x1; x2]) from the pooled, projected vectors of exactly two modalities."""
        names, xs, ms = self._prepare(streams, masks)
        if len(names) != 2:
            raise ValueError(f"{type(self).__name__} fuses exactly two modalities; got {list(names)}")
        vecs = self._pooled_vectors(names, xs, ms)
        x1, x2 = vecs[names[0]], vecs[names[1]]
        return names, x1, x2, jnp.concatenate([x1, x2], axis=-1)


class MultiplicativeGatedFusion(_GatedFusion):
    """pooled = x1 * sigma(Wx [x1; x2] + bx) + x2 * sigma(Wy [x1; x2] + by), one gate per feature (two modalities,
    in modality order). out["gates"] = {name: gate [B, width]}."""

    @nn.compact
    def __call__(self, streams: Streams, masks: Mapping[str, Array], *, train: bool = False) -> Output:
        """See the module docstring; pooled-only, plus out["gates"]."""
        del train
        names, x1, x2, both = self._two(streams, masks)
        gx = squashed_sigmoid(_dense(self.width, (None, "embed"), self.dtype, self.param_dtype, "gate_x")(both),
                              self.gate_eps)
        gy = squashed_sigmoid(_dense(self.width, (None, "embed"), self.dtype, self.param_dtype, "gate_y")(both),
                              self.gate_eps)
        pooled = (x1.astype(jnp.float32) * gx + x2.astype(jnp.float32) * gy).astype(self.dtype)
        return _out(None, None, pooled, None, gates={names[0]: gx, names[1]: gy})


class AdditiveGatedFusion(_GatedFusion):
    """pooled = l1 * x1 + l2 * x2 with (l1, l2) = sigma(W [x1; x2] + b) (two modalities, in modality order).

    per_feature=False: one scalar weight per modality and example (gates [B, 1]); True: one per feature
    (gates [B, width]). out["gates"] = {name: gate}.
    """

    per_feature: bool = False

    @nn.compact
    def __call__(self, streams: Streams, masks: Mapping[str, Array], *, train: bool = False) -> Output:
        """See the module docstring; pooled-only, plus out["gates"]."""
        del train
        names, x1, x2, both = self._two(streams, masks)
        g = self.width if self.per_feature else 1
        # Output names: a per-feature gate is an "embed" vector; two scalars are too small to shard.
        out_name = "embed" if self.per_feature else None
        z = _dense(2 * g, (None, out_name), self.dtype, self.param_dtype, "gate")(both)
        lam = squashed_sigmoid(z, self.gate_eps)
        l1, l2 = lam[:, :g], lam[:, g:]
        pooled = (l1 * x1.astype(jnp.float32) + l2 * x2.astype(jnp.float32)).astype(self.dtype)
        return _out(None, None, pooled, None, gates={names[0]: l1, names[1]: l2})


class ConcatMLPFusion(_ConcatMLP):
    """MMF's concat_mlp (the sources' Linear(768 + 768, 768) VQA model): pool each modality (masked mean or first
    token), concatenate the pooled vectors in modality order at their own widths, then an MLP: `hidden` layers of
    Dense(hidden_dim) -> activation -> dropout, and a final Dense(width) (no activation) -> pooled [B, width]."""

    @nn.compact
    def __call__(self, streams: Streams, masks: Mapping[str, Array], *, train: bool = False) -> Output:
        """See the module docstring; pooled-only (sequence/streams None)."""
        names, xs, ms = self._prepare(streams, masks)
        return _out(None, None, self._concat_mlp(names, xs, ms, train), None)


class CrossModalAttention(_TransformerFusion):
    """`depth` cross-attention layers: tokens of stream `query` attend to the other streams' tokens (concatenated
    in modality order, with their masks); residual + LN + MLP. Output sequence = the updated query stream."""

    query: Optional[str] = None  # required: the name of the query stream

    @nn.compact
    def __call__(self, streams: Streams, masks: Mapping[str, Array], *, train: bool = False) -> Output:
        """See the module docstring; streams = {query: updated, others: projected inputs}."""
        names, xs, ms = self._prepare(streams, masks)
        if self.query not in names:
            raise ValueError(f"CrossModalAttention.query must name one of the streams {list(names)}; "
                             f"got {self.query!r}")
        others = [n for n in names if n != self.query]
        if not others:
            raise ValueError("CrossModalAttention needs at least one stream besides the query")
        xs = {n: self._to_width(xs[n], n) for n in names}
        x = xs[self.query]
        kv, kv_mask = _concat(others, xs, ms)
        kv_bias = layers.padding_bias(kv_mask)
        layer_cls = self._remat(CrossAttentionLayer, 4)
        for i in range(self.depth):
            x = layer_cls(**self._layer_kwargs(), name=f"layer_{i}")(x, kv, kv_bias, not train)
        x = layers.constrain(self._final_ln(x, "ln_final"))
        mask = ms[self.query]
        return _out(x, mask, pool_tokens(x, mask, self.pool), {**xs, self.query: x})


class CoAttention(_TransformerFusion):
    """ViLBERT co-attentional layers on two streams A, B (modality order), `depth` of them: per layer both
    streams update at once, A from (queries A, keys/values B) and B from (queries B, keys/values A), each through
    its own CrossAttentionLayer (co-attention + FFN). self_attention=True follows each with a per-stream
    self-attention Block (ViLBERT's interleaved TRM). Parameters are separate per stream (`<name>` children)."""

    self_attention: bool = False
    combine: str = "product"  # pooled = pool(A) * pool(B) (ViLBERT's ITM head input) | "mean" of the two

    @nn.compact
    def __call__(self, streams: Streams, masks: Mapping[str, Array], *, train: bool = False) -> Output:
        """See the module docstring; sequence = [A; B] concatenated, streams = both updated streams."""
        if self.combine not in ("product", "mean"):
            raise ValueError(f"combine must be 'product' or 'mean'; got {self.combine!r}")
        names, xs, ms = self._prepare(streams, masks)
        if len(names) != 2:
            raise ValueError(f"CoAttention fuses exactly two streams; got {list(names)}")
        a, b = names
        xs = {n: self._to_width(xs[n], n) for n in names}
        bias = {n: layers.padding_bias(ms[n]) for n in names}
        cross_cls = self._remat(CrossAttentionLayer, 4)
        self_cls = self._remat(layers.Block, 3)
        kw = self._layer_kwargs()
        for i in range(self.depth):
            # Both updates read the layer's inputs (not each other's outputs): the two directions are simultaneous.
            new = {a: cross_cls(**kw, name=f"layer_{i}_{a}")(xs[a], xs[b], bias[b], not train),
                   b: cross_cls(**kw, name=f"layer_{i}_{b}")(xs[b], xs[a], bias[a], not train)}
            if self.self_attention:
                new = {n: self_cls(**kw, name=f"self_{i}_{n}")(new[n], bias[n], not train) for n in names}
            xs = new
        xs = {n: layers.constrain(self._final_ln(xs[n], f"ln_final_{n}")) for n in names}
        pooled = [pool_tokens(xs[n], ms[n], self.pool) for n in names]
        pooled = pooled[0] * pooled[1] if self.combine == "product" else 0.5 * (pooled[0] + pooled[1])
        sequence, mask = _concat(names, xs, ms)
        return _out(sequence, mask, pooled, xs)


class _SymmetricLayer(nn.Module):
    """One layer of SymmetricCrossAttention over the named streams (see that class for the maths)."""

    names: tuple[str, ...]
    num_heads: int
    mlp_dim: int
    norm: str = "pre"
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    ln_epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "einsum"  # layers.MultiHeadAttention.attention

    @nn.compact
    def __call__(self, xs: Mapping[str, Array], biases: Mapping[str, Array], deterministic: bool = True
                 ) -> dict[str, Array]:
        """xs {name: [B, L_n, E]}, biases {name: key-padding bias [B, 1, 1, L_n]} -> updated {name: [B, L_n, E]}."""
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post'; got {self.norm!r}")
        ln = functools.partial(layers.layer_norm, self.ln_epsilon, self.dtype, self.param_dtype)
        drop = functools.partial(nn.Dropout(self.dropout_rate), deterministic=deterministic)
        pre = self.norm == "pre"
        # Pre-LN normalises each stream once: the normalised tokens are its own queries and the other streams'
        # keys/values, as a pre-LN self-attention Block reads q, k and v from one LN(x).
        h = {n: ln(name=f"ln_1_{n}")(xs[n]) for n in self.names} if pre else dict(xs)
        out = {}
        for m in self.names:
            attn = functools.reduce(jnp.add, [
                layers.MultiHeadAttention(num_heads=self.num_heads, attention_dropout_rate=self.attention_dropout_rate,
                                          dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention,
                                          name=f"attn_{m}_from_{n}")(
                    h[m], kv=h[n], bias=biases[n], deterministic=deterministic)
                for n in self.names if n != m])
            mlp = layers.MLP(self.mlp_dim, self.activation, self.dropout_rate, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=f"mlp_{m}")
            if pre:
                x = xs[m] + drop(attn)
                x = x + drop(mlp(ln(name=f"ln_2_{m}")(x), deterministic=deterministic))
            else:
                x = ln(name=f"ln_1_{m}")(xs[m] + drop(attn))
                x = ln(name=f"ln_2_{m}")(x + drop(mlp(x, deterministic=deterministic)))
            out[m] = layers.constrain(x)
        return out


class SymmetricCrossAttention(_TransformerFusion):
    """Symmetric multi-modality cross-attention (2+ streams), `depth` layers. Per layer every stream m reads the
    layer's inputs (all updates simultaneous) through its own attention per other stream n (queries m, keys/values
    n, n's padding masked), sums them, then its own FFN; residual/LN placement follows CrossAttentionLayer:

        pre:   a_m = LN1_m(x_m);  x_m += sum_{n != m} MHA_{m<-n}(a_m, kv=a_n);  x_m += MLP_m(LN2_m(x_m))
        post:  z_m = LN1_m(x_m + sum_{n != m} MHA_{m<-n}(x_m, kv=x_n));  x_m = LN2_m(z_m + MLP_m(z_m))

    Pre-LN stacks end with a per-stream LN (`ln_final_<name>`). pooled = mean over modalities of each stream's pooled
    tokens. Parameters per layer: attn_<m>_from_<n> (M(M-1) of them), mlp_<m>, ln_1_<m>, ln_2_<m>."""

    @nn.compact
    def __call__(self, streams: Streams, masks: Mapping[str, Array], *, train: bool = False) -> Output:
        """See the module docstring; sequence = every updated stream concatenated, streams = each one."""
        names, xs, ms = self._prepare(streams, masks)
        if len(names) < 2:
            raise ValueError(f"SymmetricCrossAttention needs at least two streams; got {list(names)}")
        xs = {n: self._to_width(xs[n], n) for n in names}
        bias = {n: layers.padding_bias(ms[n]) for n in names}
        layer_cls = self._remat(_SymmetricLayer, 3)
        for i in range(self.depth):
            xs = layer_cls(names=names, **self._layer_kwargs(), name=f"layer_{i}")(xs, bias, not train)
        xs = {n: layers.constrain(self._final_ln(xs[n], f"ln_final_{n}")) for n in names}
        pooled = jnp.mean(jnp.stack([pool_tokens(xs[n], ms[n], self.pool) for n in names], axis=0), axis=0)
        sequence, mask = _concat(names, xs, ms)
        return _out(sequence, mask, pooled, xs)


class BottleneckFusion(_TransformerFusion):
    """MBT (Nagrani et al. 2021): per-modality transformer layers; from layer `fusion_layer` on, `n_bottlenecks`
    shared tokens are appended to each modality's sequence, each modality's layer updates its own copy, and the
    next bottleneck is the mean of the updated copies. Layers before `fusion_layer` never mix modalities
    (fusion_layer = depth: no fusion at all). pooled = mean over modalities of each one's pooled tokens."""

    depth: int = 2
    fusion_layer: int = 0
    n_bottlenecks: int = 4

    @nn.compact
    def __call__(self, streams: Streams, masks: Mapping[str, Array], *, train: bool = False) -> Output:
        """See the module docstring; plus out["bottleneck"] [B, n_bottlenecks, width] (None without fusion)."""
        if not 0 <= self.fusion_layer <= self.depth:
            raise ValueError(f"fusion_layer must be in [0, depth={self.depth}]; got {self.fusion_layer}")
        if self.n_bottlenecks < 1:
            raise ValueError(f"n_bottlenecks must be >= 1; got {self.n_bottlenecks}")
        names, xs, ms = self._prepare(streams, masks)
        xs = {n: self._to_width(xs[n], n) for n in names}
        batch = xs[names[0]].shape[0]
        bias = {n: layers.padding_bias(ms[n]) for n in names}
        block_cls = self._remat(layers.Block, 3)
        kw = self._layer_kwargs()

        bottleneck = None
        if self.fusion_layer < self.depth:
            # Bottleneck tokens are always real: every modality's layer may attend to all of them.
            bias_fused = {n: layers.padding_bias(jnp.concatenate(
                [ms[n], jnp.ones((batch, self.n_bottlenecks), jnp.int32)], axis=1)) for n in names}
            init = self.param("bottleneck", partitioned(layers.embed_init, ("length", "embed")),
                              (self.n_bottlenecks, self.width), self.param_dtype)
            bottleneck = jnp.broadcast_to(init.astype(self.dtype)[None], (batch, self.n_bottlenecks, self.width))

        for i in range(self.depth):
            if i < self.fusion_layer:
                xs = {n: block_cls(**kw, name=f"{n}_layer_{i}")(xs[n], bias[n], not train) for n in names}
                continue
            copies = []
            for n in names:
                length = xs[n].shape[1]
                y = block_cls(**kw, name=f"{n}_layer_{i}")(
                    jnp.concatenate([xs[n], bottleneck], axis=1), bias_fused[n], not train)
                xs[n], copy = y[:, :length], y[:, length:]
                copies.append(copy)
            bottleneck = jnp.mean(jnp.stack(copies, axis=0), axis=0)

        xs = {n: layers.constrain(self._final_ln(xs[n], f"ln_final_{n}")) for n in names}
        pooled = jnp.mean(jnp.stack([pool_tokens(xs[n], ms[n], self.pool) for n in names], axis=0), axis=0)
        sequence, mask = _concat(names, xs, ms)
        return _out(sequence, mask, pooled, xs, bottleneck=bottleneck)


class LateFusion(_Fusion):
    """Decision-level fusion: a head Dense(num_classes) per modality on its pooled (projected) vector; fused
    logits = mean ("mean") or softmax(w)-weighted mean ("learned", w initialised to 0 = the mean) of the heads.
    pooled = the same combination of the modality vectors. Extras: out["logits"] [B, C],
    out["modality_logits"] {name: [B, C]}, out["modality_weights"] [M] (in modality order)."""

    num_classes: int = 2
    weighting: str = "mean"  # "mean" | "learned"

    @nn.compact
    def __call__(self, streams: Streams, masks: Mapping[str, Array], *, train: bool = False) -> Output:
        """See the module docstring; pooled-only."""
        del train
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {self.weighting!r}")
        names, xs, ms = self._prepare(streams, masks)
        vecs = self._pooled_vectors(names, xs, ms)
        # Class dim unnamed: class counts (13 VQA answers, 2 ITM classes) rarely divide a mesh axis.
        logits = {n: _dense(self.num_classes, ("embed", None), self.dtype, self.param_dtype, f"head_{n}")(vecs[n])
                  for n in names}
        weights = _decision_weights(self, len(names), self.weighting, "modality_weights", self.param_dtype)
        fused = _weighted_sum(weights, [logits[n] for n in names], self.dtype)
        pooled = _weighted_sum(weights, [vecs[n] for n in names], self.dtype)
        return _out(None, None, pooled, None, logits=fused, modality_logits=logits, modality_weights=weights)


class HybridFusion(_ConcatMLP):
    """Hybrid (early + late) fusion. Early: f = concat_mlp's MLP over the concatenated pooled vectors (fields hidden,
    hidden_dim, activation, dropout_rate), decided by `fused_head` Dense(num_classes). Late: a head Dense(num_classes)
    per modality on its pooled, width-projected vector v_m (as LateFusion). logits = sum_k w_k * decision_k over the
    M + 1 decisions [fused, modalities in order], w = uniform ("mean") or softmax of a zero-initialised parameter
    ("learned"); pooled = the same combination of [f, v_1, ..., v_M]. Extras: out["logits"] [B, C],
    out["fused_logits"] [B, C], out["modality_logits"] {name: [B, C]}, out["decision_weights"] [M + 1]."""

    num_classes: int = 2
    weighting: str = "learned"  # "mean" | "learned"

    @nn.compact
    def __call__(self, streams: Streams, masks: Mapping[str, Array], *, train: bool = False) -> Output:
        """See the module docstring; pooled-only."""
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {self.weighting!r}")
        names, xs, ms = self._prepare(streams, masks)
        fused = layers.constrain(self._concat_mlp(names, xs, ms, train), layers.POOLED_AXES)
        vecs = self._pooled_vectors(names, xs, ms)
        # Class dim unnamed, as in LateFusion.
        head = functools.partial(_dense, self.num_classes, ("embed", None), self.dtype, self.param_dtype)
        fused_logits = head("fused_head")(fused)
        logits = {n: head(f"head_{n}")(vecs[n]) for n in names}
        weights = _decision_weights(self, 1 + len(names), self.weighting, "decision_weights", self.param_dtype)
        combined = _weighted_sum(weights, [fused_logits, *(logits[n] for n in names)], self.dtype)
        pooled = _weighted_sum(weights, [fused, *(vecs[n] for n in names)], self.dtype)
        return _out(None, None, pooled, None, logits=combined, fused_logits=fused_logits, modality_logits=logits,
                    decision_weights=weights)


class SharedWeightsFusion(_TransformerFusion):
    """Parameter-sharing fusion: ONE Encoder (and final LN) serves every modality; each modality runs through it
    separately after its modality-type embedding. pooled = mean of the modalities' pooled vectors
    ("mean") or Dense(concat) ("concat"). Only type embeddings (and width projections) are per modality."""

    combine: str = "mean"  # "mean" | "concat"

    @nn.compact
    def __call__(self, streams: Streams, masks: Mapping[str, Array], *, train: bool = False) -> Output:
        """See the module docstring; streams = each modality's encoder output, sequence their concatenation."""
        if self.combine not in ("mean", "concat"):
            raise ValueError(f"combine must be 'mean' or 'concat'; got {self.combine!r}")
        names, xs, ms = self._prepare(streams, masks)
        # One module instance called once per modality = one set of weights (linen shares params per instance).
        encoder = self._encoder(self.depth, "encoder")
        final_ln = (layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln_final")
                    if self.norm == "pre" and self.depth > 0 else None)
        drop = nn.Dropout(self.dropout_rate)
        outs = {}
        for n in names:
            x = self._to_width(xs[n], n) + self._type_embedding(n)
            x = encoder(drop(x, deterministic=not train), layers.padding_bias(ms[n]), not train)
            outs[n] = layers.constrain(final_ln(x) if final_ln is not None else x)
        vecs = [pool_tokens(outs[n], ms[n], self.pool) for n in names]
        if self.combine == "mean":
            pooled = jnp.mean(jnp.stack(vecs, axis=0), axis=0)
        else:
            pooled = _dense(self.width, (None, "embed"), self.dtype, self.param_dtype, "combine")(
                jnp.concatenate(vecs, axis=-1))
        sequence, mask = _concat(names, outs, ms)
        return _out(sequence, mask, pooled, outs)


# ------------------------------------------------------------------------------------------------- registry

FUSION_BLOCKS: dict[str, type[nn.Module]] = {
    "concat": ConcatFusion,
    "sum": SumFusion,
    "multiplicative_gated": MultiplicativeGatedFusion,
    "additive_gated": AdditiveGatedFusion,
    "cross_attention": CrossModalAttention,
    "co_attention": CoAttention,
    "bottleneck": BottleneckFusion,
    "late": LateFusion,
    "shared_weights": SharedWeightsFusion,
    "concat_mlp": ConcatMLPFusion,
    "hybrid": HybridFusion,
    "symmetric_cross_attention": SymmetricCrossAttention,
}


def build_fusion(name: str, **kwargs: Any) -> nn.Module:
    """Fusion block by registry name with its fields as kwargs; unknown names or fields raise listing valid ones."""
    if name not in FUSION_BLOCKS:
        near = difflib.get_close_matches(name, list(FUSION_BLOCKS), n=3)
        hint = f" (did you mean {near}?)" if near else ""
        raise ValueError(f"Unknown fusion block {name!r}{hint}; known: {sorted(FUSION_BLOCKS)}")
    cls = FUSION_BLOCKS[name]
    valid = [f for f in cls.__dataclass_fields__ if f not in ("parent", "name")]
    for key in kwargs:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3) or valid
            raise ValueError(f"Unknown field {key!r} for fusion block {name!r} ({cls.__name__}); nearest valid: {near}")
    if isinstance(kwargs.get("modalities"), list):
        kwargs["modalities"] = tuple(kwargs["modalities"])  # Module fields must be hashable
    return cls(**kwargs)


__all__ = [
    "AdditiveGatedFusion", "BottleneckFusion", "CoAttention", "ConcatFusion", "ConcatMLPFusion", "CrossModalAttention",
    "FUSION_BLOCKS", "HybridFusion", "LateFusion", "MultiplicativeGatedFusion", "SharedWeightsFusion", "SumFusion",
    "SymmetricCrossAttention", "build_fusion", "pool_tokens", "squashed_sigmoid",
]
