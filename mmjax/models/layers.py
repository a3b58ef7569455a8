"""Shared model parts: attention, MLP, pre-/post-LN blocks (self- and cross-attention), the encoder stack, BERT-style
text embeddings, patch embedding and position-table interpolation, masked pooling and the one remat helper.

Model families (clip, vilt, uniter, vilbert, fusion_model, bert) build from these, from the towers (vit.py, text.py),
the heads (heads.py) and the fusion blocks (fusion.py); no family file imports another family's file.

Logical axis names of parameters (every parameter carries them; `mmjax.sharding` maps them to mesh axes via config
rules):

    embed    model width (d_model): LN scale/bias, most kernel in/out dims
    mlp      hidden width of the feed-forward MLP
    heads    attention heads
    kv       per-head width (head_dim) of q/k/v
    vocab    token vocabulary (embedding tables)
    length   sequence position (position-embedding tables)
    joint    output width of the CLIP image/text projections (the shared embedding space)
    layers   the leading depth axis of an Encoder's stacked params under nn.scan (Encoder(scan=True)); never sharded
    None     dims never sharded: conv/patch spatial dims and input channels, scalar params have ()

Activations use their own names in `nn.with_logical_constraint` (via `constrain`; a no-op unless the trainer sets a
mesh and logical-axis rules), so that a rule for a parameter axis never moves an activation axis and vice versa:

    activation_batch    batch (ACT_AXES, pooled vectors, decoding caches)
    activation_length   sequence position of token activations and of the caches
    activation_embed    model width of the residual stream and pooled vectors
    activation_heads    attention heads of the decoding caches (CACHE_AXES)
    activation_kv       per-head width of the decoding caches
    activation_joint    the joint embedding width of contrastive embeds (the tasks constrain those)
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

# Finite (not -inf) so that a fully masked row gives a uniform softmax instead of NaN; logits are float32 when
# the bias is added, so this dwarfs any real logit without overflowing.
NEG_INF = -1e9

ACT_AXES = ("activation_batch", "activation_length", "activation_embed")  # token activations [B, L, E]
POOLED_AXES = ("activation_batch", "activation_embed")  # pooled vectors [B, E]
# Decoding's key/value caches, heads-major [B, H, L, D].
CACHE_AXES = ("activation_batch", "activation_heads", "activation_length", "activation_kv")

# MultiHeadAttention.attention values: "einsum" is our own two-einsum path; the others go through
# jax.nn.dot_product_attention with this `implementation` ("auto": jax picks, today XLA).
ATTENTION_IMPLEMENTATIONS: dict[str, Optional[str]] = {"einsum": None, "xla": "xla", "cudnn": "cudnn", "auto": None}

# Inits: xavier-uniform for dense kernels (ViT/BERT-style), normal(0.02) for embeddings, zeros for biases.
dense_init = nn.initializers.xavier_uniform()
embed_init = nn.initializers.normal(stddev=0.02)
zeros_init = nn.initializers.zeros
ones_init = nn.initializers.ones


def partitioned(init: Callable, names: Sequence[Optional[str]]) -> Callable:
    """Shorthand for `nn.with_logical_partitioning(init, names)`."""
    return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: Array, names: Sequence[Optional[str]] = ACT_AXES) -> Array:
    """Logical sharding constraint on an activation (no-op without mesh + rules)."""
    return nn.with_logical_constraint(x, tuple(names))


def quick_gelu(x: Array) -> Array:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


@jax.custom_vjp
def gelu_exact(x: Array) -> Array:
    """Exact (erf) GELU, as Hugging Face's "gelu"; jax.nn.gelu defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_exact_fwd(x: Array) -> tuple[Array, Array]:
    return gelu_exact(x), x


def _gelu_exact_bwd(x: Array, g: Array) -> tuple[Array]:
    # d/dx x*Phi(x) = Phi(x) + x*phi(x). The barrier materialises this once: left to itself XLA:CPU fuses the
    # derivative into the next matmul's operand and recomputes it per tile (1.7x slower MLP backward here).
    cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return (jax.lax.optimization_barrier(g * (cdf + x * pdf).astype(g.dtype)),)


gelu_exact.defvjp(_gelu_exact_fwd, _gelu_exact_bwd)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu_exact,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Activation function by name; unknown names raise listing the known ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def padding_bias(mask: Array) -> Array:
    """Key-padding mask [B, Lk] (1/True = real) -> additive attention bias [B, 1, 1, Lk] (float32)."""
    mask = jnp.asarray(mask)
    return jnp.where(mask[:, None, None, :] > 0, 0.0, NEG_INF).astype(jnp.float32)


def causal_bias(length: int) -> Array:
    """Additive causal bias [1, 1, L, L]: query i may attend keys j <= i."""
    allowed = jnp.tril(jnp.ones((length, length), dtype=bool))
    return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)[None, None]


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean of x [B, L, D] over real positions (mask [B, L], 1 = real) -> [B, D]; all-padding rows give 0."""
    m = jnp.asarray(mask) > 0
    # `where`, not x * mask: garbage in padded slots (even inf/NaN) must not leak; sum in float32 for bf16.
    total = jnp.sum(jnp.where(m[..., None], x.astype(jnp.float32), 0.0), axis=1)
    count = jnp.maximum(jnp.sum(m, axis=1, keepdims=True).astype(jnp.float32), 1.0)
    return (total / count).astype(x.dtype)


# jax.checkpoint_policies entries that build a policy from arguments (names to save, offload targets): a config
# names a policy by a string, so only the ready-made policies can be used.
_POLICY_FACTORIES = frozenset({"offload_dot_with_no_batch_dims", "save_and_offload_only_these_names",
                               "save_any_names_but_these", "save_anything_except_these_names",
                               "save_from_both_policies", "save_only_these_names"})


def remat_policy_names() -> list[str]:
    """The names `remat_policy` accepts: jax.checkpoint_policies' ready-made policies (not its factories)."""
    return sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_") and n not in _POLICY_FACTORIES)


def remat(module_cls: type[nn.Module], enabled: bool, policy_name: str = "nothing_saveable",
          static_argnums: Sequence[int] = (), prevent_cse: bool = True) -> type[nn.Module]:
    """`module_cls` rematerialised with jax.checkpoint_policies.<policy_name> when `enabled`, else unchanged.

    The one place models turn `remat` / `remat_policy` into nn.remat. `static_argnums` counts `self` as 0; pass
    the position of `deterministic` (a Python bool that picks code paths, so it cannot be traced). The policy
    name is checked even when remat is off, so a typo in a config fails at once rather than when remat is
    turned on. prevent_cse=False is for remat inside nn.scan, where the loop already keeps XLA from merging the
    recomputation with the forward pass (jax.checkpoint's docs).
    """
    valid = remat_policy_names()
    if policy_name not in valid:
        raise ValueError(f"Unknown remat_policy {policy_name!r}; known: {valid}")
    if not enabled:
        return module_cls
    return nn.remat(module_cls, policy=getattr(jax.checkpoint_policies, policy_name),
                    static_argnums=tuple(static_argnums), prevent_cse=prevent_cse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm_fn(x: Array, scale: Array, bias: Array, epsilon: float, dtype: Dtype) -> Array:
    """LayerNorm over the last axis with float32 statistics (two-pass variance), output in `dtype`."""
    return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_fwd(x: Array, scale: Array, bias: Array, epsilon: float, dtype: Dtype) -> tuple[Array, tuple]:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
    y = centred * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    # Saves the input and two per-row statistics, as torch does: differentiating flax's LayerNorm saved the
    # [..., D] product rstd * scale too, one more activation-sized buffer written per LayerNorm.
    return y.astype(dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(epsilon: float, dtype: Dtype, residuals: tuple, dy: Array) -> tuple[Array, Array, Array]:
    del epsilon, dtype
    x, mean, rstd, scale, bias = residuals
    normed = (x.astype(jnp.float32) - mean) * rstd
    dy = dy.astype(jnp.float32)
    rows = tuple(range(dy.ndim - 1))
    g = dy * scale.astype(jnp.float32)
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - normed * jnp.mean(g * normed, axis=-1, keepdims=True))
    return (dx.astype(x.dtype), jnp.sum(dy * normed, axis=rows).astype(scale.dtype),
            jnp.sum(dy, axis=rows).astype(bias.dtype))


layer_norm_fn.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """nn.LayerNorm's parameters (scale, bias) and float32 statistics, with a hand-written backward pass that
    keeps only the input and per-row mean / inverse deviation (fewer, smaller buffers than autodiff of flax's)."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scale_init: Callable = ones_init
    bias_init: Callable = zeros_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., D] -> [..., D] in `dtype`."""
        scale = self.param("scale", self.scale_init, (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", self.bias_init, (x.shape[-1],), self.param_dtype)
        return layer_norm_fn(x, scale, bias, self.epsilon, self.dtype)


def layer_norm(epsilon: float, dtype: Dtype, param_dtype: Dtype, name: Optional[str] = None) -> LayerNorm:
    """LayerNorm with logically partitioned ("embed",) scale and bias; statistics are reduced in float32."""
    return LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(ones_init, ("embed",)),
        bias_init=partitioned(zeros_init, ("embed",)),
        name=name,
    )


def matmul_last(x: Array, kernel: Array) -> Array:
    """x [..., K] @ kernel [K, ...] as one 2-D matmul.

    XLA:CPU runs a dot that contracts several dims (the kernel gradient of a [B, L, K] input contracts B and L)
    through a slow generic loop; flattening to 2-D keeps forward and backward on the fast GEMM path (a 2.5x
    faster MLP backward on the tiny CLIP shapes).
    """
    out_shape = kernel.shape[1:]
    y = x.reshape(-1, x.shape[-1]) @ kernel.reshape(kernel.shape[0], -1)
    return y.reshape(*x.shape[:-1], *out_shape)


def patchify(image: Array, patch_size: int) -> Array:
    """image [B, H, W, C] -> patches [B, N, p*p*C] in raster order, pixels (row, col, channel) within a patch.

    The input layout of `patch_embedding` (its kernel is the conv's HWIO kernel flattened the same way) and of
    ViLT's `mpp_pred`, so MPP targets are `patchify(image, p)`.
    """
    p = patch_size
    return einops.rearrange(image, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)


def patch_embedding(owner: nn.Module, image: Array, patch_size: int, width: int, *, use_bias: bool = True,
                    dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> Array:
    """Non-overlapping patch projection inside `owner`'s compact scope: image [B, H, W, C] -> [B, N, width].

    Creates `owner`'s parameters `patch_kernel` [p, p, C, width] (a conv kernel in HWIO layout, so checkpoints'
    patch convs map one-to-one) and, with use_bias, `patch_bias` [width]. Computed as patchify + one matmul: the
    same maths as a conv with kernel = stride = p, and a plain dot_general is what XLA:CPU runs fastest.
    """
    p, c = patch_size, image.shape[-1]
    kernel = owner.param("patch_kernel", partitioned(nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                                                     (None, None, None, "embed")), (p, p, c, width), param_dtype)
    x = matmul_last(patchify(image.astype(dtype), p), kernel.reshape(-1, width).astype(dtype))
    if use_bias:
        x = x + owner.param("patch_bias", partitioned(zeros_init, ("embed",)), (width,), param_dtype).astype(dtype)
    return x


def interpolate_pos_embedding(table: Array, grid: tuple[int, int], new_grid: tuple[int, int],
                              method: str = "bicubic") -> Array:
    """Position table [1 + gh*gw, D] (cls row first) -> [1 + nh*nw, D] for a new patch grid.

    The cls row is kept; the patch rows are resized as a 2-D grid [gh, gw, D] (jax.image.resize, half-pixel
    centres, in float32). The same grid returns the table unchanged, so the training resolution is exact.
    """
    if tuple(grid) == tuple(new_grid):
        return table
    gh, gw = grid
    if table.shape[0] != 1 + gh * gw:
        raise ValueError(f"position table has {table.shape[0]} rows; grid {gh}x{gw} (+cls) needs {1 + gh * gw}")
    cls, patches = table[:1], table[1:].reshape(gh, gw, table.shape[-1]).astype(jnp.float32)
    patches = jax.image.resize(patches, (*new_grid, table.shape[-1]), method=method)
    return jnp.concatenate([cls, patches.reshape(-1, table.shape[-1]).astype(table.dtype)], axis=0)


class Dense(nn.Module):
    """nn.Dense with the same parameters (kernel [in, out], bias [out]) computed as a 2-D matmul."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = dense_init
    bias_init: Callable = zeros_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., in] -> [..., features]."""
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        y = matmul_last(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(self.dtype)
        return y


class HeadsProjection(nn.Module):
    """Projects [..., E] to per-head [..., heads, head_dim] with a (embed, heads, kv) kernel.

    An explicit 3-D kernel rather than nn.DenseGeneral: DenseGeneral initialises a flattened 2-D kernel, which
    breaks the 3-name logical partitioning (and its sharding constraint) under a mesh.
    """

    num_heads: int
    head_dim: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., E] -> [..., heads, head_dim]."""
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
        kernel = self.param("kernel", partitioned(init, ("embed", "heads", "kv")),
                            (x.shape[-1], self.num_heads, self.head_dim), self.param_dtype)
        y = matmul_last(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", partitioned(zeros_init, ("heads", "kv")),
                              (self.num_heads, self.head_dim), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class HeadsOutput(nn.Module):
    """Merges per-head [..., heads, head_dim] back to [..., features] with a (heads, kv, embed) kernel."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., heads, head_dim] -> [..., features]."""
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)
        kernel = self.param("kernel", partitioned(init, ("heads", "kv", "embed")),
                            (x.shape[-2], x.shape[-1], self.features), self.param_dtype)
        x = x.reshape(*x.shape[:-2], -1)
        y = matmul_last(x.astype(self.dtype), kernel.reshape(-1, self.features).astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", partitioned(zeros_init, ("embed",)), (self.features,),
                               self.param_dtype).astype(self.dtype)
        return y


def check_attention(attention: str, attention_dropout_rate: float = 0.0) -> None:
    """Raises a one-line ValueError for an unknown `attention` or attention dropout with a fused kernel."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"Unknown attention {attention!r}; known: {sorted(ATTENTION_IMPLEMENTATIONS)}")
    if attention != "einsum" and attention_dropout_rate > 0:
        raise ValueError(f"attention={attention!r} has no attention dropout (jax.nn.dot_product_attention); set "
                         f"attention_dropout_rate=0 or attention='einsum' (got {attention_dropout_rate})")


def _fused_bias(bias: Optional[Array], attention: str, q: Array, k: Array) -> Optional[Array]:
    """Our additive bias (broadcastable to [B, H, Lq, Lk]) as dot_product_attention takes it: 4-D, float32 for
    XLA (added to float32 logits); cuDNN wants the full [., ., Lq, Lk] extent in the compute dtype."""
    if bias is None:
        return None
    bias = jnp.asarray(bias)
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    if attention == "cudnn":
        shape = (bias.shape[0], bias.shape[1], q.shape[1], k.shape[1])
        return jnp.broadcast_to(bias, shape).astype(q.dtype)
    return bias.astype(jnp.float32)


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention with separate q/k/v projections and an additive mask bias.

    Self-attention: `attn(x)`. Cross-attention: `attn(x, kv=other)` (queries from x, keys/values from other).

    decode=True keeps keys and values in the "cache" collection for incremental decoding (apply with
    mutable=["cache"]). The first call creates the cache, as flax's decoders do: self-attention sizes it from
    that call's input length (pass the full [B, max_len] once; its output is not used) and cross-attention stores
    the projected memory. Later calls append the new positions' keys at `cache_index`, attend causally over the
    cache (queries at absolute positions index .. index + T - 1), and reuse the stored memory keys, so `kv` is
    ignored then and may be any array of the right batch size.

    `attention` picks the kernel: "einsum" (default) is our own batched einsums with a float32 softmax; "xla",
    "cudnn" and "auto" call `jax.nn.dot_product_attention` with implementation "xla" / "cudnn" / None (jax's
    choice), in its [B, L, H, D] layout, with the additive `bias` as its bias (logits and softmax in float32 for
    bf16 inputs). The same parameters serve every choice. "cudnn" needs a GPU and bf16/fp16 compute (and, for
    training with a mask, even sequence lengths). dot_product_attention has no dropout, so attention_dropout_rate
    > 0 needs "einsum". The decode path (KV cache) always uses the einsum path.
    """

    num_heads: int
    head_dim: Optional[int] = None  # default: width // num_heads
    out_features: Optional[int] = None  # default: width of x
    use_bias: bool = True
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    decode: bool = False
    attention: str = "einsum"  # a key of ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(
        self,
        x: Array,
        kv: Optional[Array] = None,
        bias: Optional[Array] = None,
        deterministic: bool = True,
    ) -> Array:
        """x: [B, Lq, E]; kv: [B, Lk, E'] (defaults to x); bias broadcastable to [B, H, Lq, Lk]."""
        kv = x if kv is None else kv
        width = x.shape[-1]
        if self.head_dim is None and width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = self.head_dim or width // self.num_heads
        check_attention(self.attention, self.attention_dropout_rate)

        proj = functools.partial(HeadsProjection, num_heads=self.num_heads, head_dim=head_dim,
                                 use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        output = functools.partial(HeadsOutput, features=self.out_features or width, use_bias=self.use_bias,
                                   dtype=self.dtype, param_dtype=self.param_dtype, name="out")
        if self.attention != "einsum" and not self.decode:
            # [B, L, H, D] throughout, dot_product_attention's layout: no transposes. It scales the float32 logits.
            q, k, v = proj(name="query")(x), proj(name="key")(kv), proj(name="value")(kv)
            out = jax.nn.dot_product_attention(q, k, v, bias=_fused_bias(bias, self.attention, q, k),
                                               scale=head_dim**-0.5,
                                               implementation=ATTENTION_IMPLEMENTATIONS[self.attention])
            return output()(out)
        # Scale q (smaller than the logits tensor) rather than the [B, H, Lq, Lk] logits.
        q = jnp.swapaxes(proj(name="query")(x) * jnp.asarray(head_dim**-0.5, self.dtype), 1, 2)
        cross = kv is not x
        if self.decode and cross and self.has_variable("cache", "cross_key"):
            k, v = self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
        else:
            # Heads-major [B, H, L, D] so both attention matmuls have leading batch dims (XLA:CPU's fast batched
            # GEMM; the [B, L, H, D] einsums were 2.4x slower in the forward pass here).
            k = jnp.swapaxes(proj(name="key")(kv), 1, 2)
            v = jnp.swapaxes(proj(name="value")(kv), 1, 2)
            if self.decode and cross:
                self.variable("cache", "cross_key", lambda: constrain(k, CACHE_AXES))
                self.variable("cache", "cross_value", lambda: constrain(v, CACHE_AXES))
            elif self.decode:
                k, v, bias = self._append_to_cache(k, v, bias)

        # One batched dot_general over all heads (no per-head loops); softmax in float32 for stability in bf16.
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
        if bias is not None:
            logits = logits + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        weights = nn.Dropout(self.attention_dropout_rate)(weights, deterministic=deterministic)
        out = jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights, v), 1, 2)
        return output()(out)

    def _append_to_cache(self, k: Array, v: Array, bias: Optional[Array]) -> tuple[Array, Array, Optional[Array]]:
        """Self-attention decoding: writes k, v [B, H, T, D] at cache_index and returns the whole cache with the
        causal bias over it (the call that creates the cache returns its inputs unchanged)."""
        created = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not created:
            return k, v, bias
        i, steps, length = index.value, k.shape[2], cached_k.value.shape[2]
        cached_k.value = constrain(jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype),
                                                                (0, 0, i, 0)), CACHE_AXES)
        cached_v.value = constrain(jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype),
                                                                (0, 0, i, 0)), CACHE_AXES)
        index.value = i + steps
        # Query t (absolute position i + t) sees cached keys j <= i + t; later slots hold zeros, masked out.
        allowed = jnp.arange(length)[None, :] <= (i + jnp.arange(steps))[:, None]
        causal = jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)[None, None]
        return cached_k.value, cached_v.value, causal if bias is None else bias + causal


class MLP(nn.Module):
    """Feed-forward block: Dense(mlp_dim) -> activation -> dropout -> Dense(width)."""

    mlp_dim: int
    activation: str = "gelu"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        """x: [..., E] -> [..., E]."""
        width = x.shape[-1]
        dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(
            self.mlp_dim,
            kernel_init=partitioned(dense_init, ("embed", "mlp")),
            bias_init=partitioned(zeros_init, ("mlp",)),
            name="fc1",
        )(x)
        h = get_activation(self.activation)(h)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense(
            width,
            kernel_init=partitioned(dense_init, ("mlp", "embed")),
            bias_init=partitioned(zeros_init, ("embed",)),
            name="fc2",
        )(h)


class Block(nn.Module):
    """Transformer encoder block.

    norm="pre"  (CLIP/ViT):  x = x + MHA(LN(x)); x = x + MLP(LN(x))
    norm="post" (BERT/ViLT): z = LN(x + MHA(x)); o = LN(z + MLP(z))
    """

    num_heads: int
    mlp_dim: int
    norm: str = "pre"
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    ln_epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "einsum"  # MultiHeadAttention.attention

    @nn.compact
    def __call__(self, x: Array, bias: Optional[Array] = None, deterministic: bool = True) -> Array:
        """x: [B, L, E]; bias: additive attention bias broadcastable to [B, H, L, L]."""
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {self.norm!r}")
        x = constrain(x)
        ln1 = layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln_1")
        ln2 = layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln_2")
        attn = MultiHeadAttention(
            num_heads=self.num_heads,
            attention_dropout_rate=self.attention_dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention=self.attention,
            name="attn",
        )
        mlp = MLP(
            mlp_dim=self.mlp_dim,
            activation=self.activation,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )
        drop = nn.Dropout(self.dropout_rate)

        if self.norm == "pre":
            x = x + drop(attn(ln1(x), bias=bias, deterministic=deterministic), deterministic=deterministic)
            x = x + drop(mlp(ln2(x), deterministic=deterministic), deterministic=deterministic)
        else:
            x = ln1(x + drop(attn(x, bias=bias, deterministic=deterministic), deterministic=deterministic))
            x = ln2(x + drop(mlp(x, deterministic=deterministic), deterministic=deterministic))
        return constrain(x)


class CrossAttentionLayer(nn.Module):
    """Cross-attention transformer layer: queries x attend to kv, then an MLP, each with residual + LayerNorm.

    norm="pre":  x = x + MHA(LN(x), kv=LN_kv(kv)); x = x + MLP(LN(x))
    norm="post": x = LN(x + MHA(x, kv=kv));       x = LN(x + MLP(x))     (BERT/ViLBERT)

    Parameters: cross_attn (MultiHeadAttention), mlp, ln_1, ln_2, and ln_kv (pre-LN only).
    """

    num_heads: int
    mlp_dim: int
    norm: str = "pre"
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    ln_epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "einsum"  # MultiHeadAttention.attention

    @nn.compact
    def __call__(self, x: Array, kv: Array, kv_bias: Optional[Array] = None, deterministic: bool = True) -> Array:
        """x: [B, Lq, E]; kv: [B, Lk, E]; kv_bias: additive key bias broadcastable to [B, H, Lq, Lk]."""
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {self.norm!r}")
        ln = functools.partial(layer_norm, self.ln_epsilon, self.dtype, self.param_dtype)
        attn = MultiHeadAttention(num_heads=self.num_heads, attention_dropout_rate=self.attention_dropout_rate,
                                  dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention,
                                  name="cross_attn")
        mlp = MLP(self.mlp_dim, self.activation, self.dropout_rate, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="mlp")
        drop = functools.partial(nn.Dropout(self.dropout_rate), deterministic=deterministic)
        x = constrain(x)
        if self.norm == "pre":
            x = x + drop(attn(ln(name="ln_1")(x), kv=ln(name="ln_kv")(kv), bias=kv_bias,
                              deterministic=deterministic))
            x = x + drop(mlp(ln(name="ln_2")(x), deterministic=deterministic))
        else:
            x = ln(name="ln_1")(x + drop(attn(x, kv=kv, bias=kv_bias, deterministic=deterministic)))
            x = ln(name="ln_2")(x + drop(mlp(x, deterministic=deterministic)))
        return constrain(x)


class DecoderBlock(nn.Module):
    """Transformer decoder block: causal self-attention, then (cross_attention) attention to a memory sequence,
    then an MLP, each with a residual.

    norm="pre":  x = x + SA(LN(x)); x = x + CA(LN(x), memory); x = x + MLP(LN(x))      (GPT-2 / CoCa)
    norm="post": x = LN(x + SA(x)); x = LN(x + CA(x, memory)); x = LN(x + MLP(x))      (BERT-style decoders)

    Parameters: ln_1, attn, (ln_cross, cross_attn), ln_2, mlp. With decode=True both attentions cache their keys
    and values (MultiHeadAttention); `bias` is then ignored, the cache supplying the causal mask.
    """

    num_heads: int
    mlp_dim: int
    cross_attention: bool = True
    norm: str = "pre"
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    ln_epsilon: float = 1e-6
    decode: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "einsum"  # MultiHeadAttention.attention (decoding always runs the einsum path)

    @nn.compact
    def __call__(self, x: Array, bias: Optional[Array] = None, memory: Optional[Array] = None,
                 memory_bias: Optional[Array] = None, deterministic: bool = True) -> Array:
        """x: [B, L, E]; bias: the causal (+ padding) bias [B, 1, L, L]; memory [B, N, E'] with its key bias
        memory_bias broadcastable to [B, H, L, N]."""
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {self.norm!r}")
        if self.cross_attention and memory is None:
            raise ValueError("a DecoderBlock with cross_attention needs `memory`")
        ln = functools.partial(layer_norm, self.ln_epsilon, self.dtype, self.param_dtype)
        attn = functools.partial(MultiHeadAttention, num_heads=self.num_heads, decode=self.decode,
                                 attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
                                 param_dtype=self.param_dtype, attention=self.attention)
        drop = functools.partial(nn.Dropout(self.dropout_rate), deterministic=deterministic)
        self_bias = None if self.decode else bias
        sublayers = [("ln_1", lambda h: attn(name="attn")(h, bias=self_bias, deterministic=deterministic))]
        if self.cross_attention:
            sublayers.append(("ln_cross", lambda h: attn(name="cross_attn")(h, kv=memory, bias=memory_bias,
                                                                           deterministic=deterministic)))
        mlp = MLP(self.mlp_dim, self.activation, self.dropout_rate, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="mlp")
        sublayers.append(("ln_2", lambda h: mlp(h, deterministic=deterministic)))
        x = constrain(x)
        for name, sublayer in sublayers:
            if self.norm == "pre":
                x = x + drop(sublayer(ln(name=name)(x)))
            else:
                x = ln(name=name)(x + drop(sublayer(x)))
        return constrain(x)


class Decoder(nn.Module):
    """Stack of `depth` DecoderBlocks named layer_0 ... layer_{depth-1} (no final LayerNorm: the owner adds it).

    Remat applies to training only: decoding (decode=True) writes the cache, and runs one token at a time.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    cross_attention: bool = True
    norm: str = "pre"
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    ln_epsilon: float = 1e-6
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    decode: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "einsum"  # MultiHeadAttention.attention (decoding always runs the einsum path)

    @nn.compact
    def __call__(self, x: Array, bias: Optional[Array] = None, memory: Optional[Array] = None,
                 memory_bias: Optional[Array] = None, deterministic: bool = True) -> Array:
        """x: [B, L, E] -> [B, L, E]; arguments as DecoderBlock's."""
        # static_argnums counts `self` as 0: `deterministic` (5) is a Python bool that selects code paths.
        block_cls = remat(DecoderBlock, self.remat and not self.decode, self.remat_policy, static_argnums=(5,))
        for i in range(self.depth):
            x = block_cls(num_heads=self.num_heads, mlp_dim=self.mlp_dim, cross_attention=self.cross_attention,
                          norm=self.norm, activation=self.activation, dropout_rate=self.dropout_rate,
                          attention_dropout_rate=self.attention_dropout_rate, ln_epsilon=self.ln_epsilon,
                          decode=self.decode, dtype=self.dtype, param_dtype=self.param_dtype,
                          attention=self.attention, name=f"layer_{i}")(x, bias, memory, memory_bias, deterministic)
        return x


class _ScanBlock(Block):
    """A Block in nn.scan's body form: (x, bias, deterministic) -> (x, None), with the Block's own parameters."""

    def __call__(self, x: Array, bias: Optional[Array] = None, deterministic: bool = True) -> tuple[Array, None]:
        """As Block.__call__; the None is scan's (empty) per-layer output."""
        return super().__call__(x, bias, deterministic), None


class Encoder(nn.Module):
    """Stack of `depth` Blocks, optionally rematerialised.

    scan=False (default): a Python loop; parameters layer_0 ... layer_{depth-1}, which weight conversion and
    per-layer learning-rate decay (optimizer.layer_decay) read. scan=True: one Block under nn.scan (compiles once
    however deep); parameters `layers/...` stacked with a leading [depth] axis named "layers" (never sharded).
    `mmjax.models.scan_params` converts between the two layouts, so both load the same checkpoints.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    norm: str = "pre"
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    ln_epsilon: float = 1e-6
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # any name in jax.checkpoint_policies
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "einsum"  # MultiHeadAttention.attention
    scan: bool = False

    @nn.compact
    def __call__(self, x: Array, bias: Optional[Array] = None, deterministic: bool = True) -> Array:
        """x: [B, L, E] -> [B, L, E] (no final LayerNorm: the model owning the stack adds it)."""
        block = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, norm=self.norm, activation=self.activation,
                     dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
                     ln_epsilon=self.ln_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                     attention=self.attention)
        if self.scan:
            # nn.remat inside nn.scan: each step recomputes its own Block in the backward pass. deterministic (3)
            # stays a Python bool: broadcast args reach the body as they are.
            body = remat(_ScanBlock, self.remat, self.remat_policy, static_argnums=(3,), prevent_cse=False)
            stack = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(**block, name="layers")(x, bias, deterministic)
            return x
        # static_argnums counts `self` as 0: `deterministic` (3) is a Python bool that selects code paths.
        block_cls = remat(Block, self.remat, self.remat_policy, static_argnums=(3,))
        for i in range(self.depth):
            x = block_cls(**block, name=f"layer_{i}")(x, bias, deterministic)
        return x


def tower_encoder(tower: nn.Module, name: str = "encoder") -> Encoder:
    """The Encoder of a tower module whose fields use the towers' names (depth, heads, width, mlp_dim, norm, ...,
    remat, remat_policy, and where it has them attention and scan_layers)."""
    return Encoder(
        depth=tower.depth,
        num_heads=tower.heads,
        mlp_dim=tower.mlp_dim or 4 * tower.width,
        norm=tower.norm,
        activation=tower.activation,
        dropout_rate=tower.dropout_rate,
        attention_dropout_rate=tower.attention_dropout_rate,
        ln_epsilon=tower.ln_epsilon,
        remat=tower.remat,
        remat_policy=tower.remat_policy,
        dtype=tower.dtype,
        param_dtype=tower.param_dtype,
        attention=getattr(tower, "attention", "einsum"),
        scan=getattr(tower, "scan_layers", False),
        name=name,
    )


class TextEmbeddings(nn.Module):
    """BERT-style text embeddings: word + position (0..L-1) [+ token type] [-> LayerNorm].

    Parameters (logical axes in brackets):

        word_embedding  [vocab_size, width]       ("vocab", "embed")   also the tied MLM decoder's weight
        pos_embedding   [max_len, width]          ("length", "embed")
        type_embedding  [type_vocab_size, width]  (None, "embed")      only when type_vocab_size > 0
        ln              LayerNorm scale / bias     ("embed",)           only when use_ln

    `__call__(ids, type_ids, mask)` returns (embeddings [B, L, width] in dtype, the word table [vocab_size, width]
    in param_dtype); the owner reads the table for a tied MLM decoder. Missing type_ids mean type 0. With a `mask`
    (1 = real), padded slots look up row 0 of the word and type tables: an out-of-range id there would gather NaN,
    which attention's 0 weight on that key cannot cancel (0 * NaN = NaN). Without one the ids are used as given,
    so padded outputs depend on the padded ids (real ones never do: attention masks them out).
    `type_rows(type_ids)` reads rows of the type table for tokens that are not text (UNITER's regions share the
    table, as row 1). Dropout is left to the owner.
    """

    vocab_size: int
    max_len: int
    width: int
    type_vocab_size: int = 0
    use_ln: bool = True
    ln_epsilon: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        # setup (not compact) so that `type_rows` can read the type table from outside `__call__`.
        self.word_embedding = self.param("word_embedding", partitioned(embed_init, ("vocab", "embed")),
                                         (self.vocab_size, self.width), self.param_dtype)
        self.pos_embedding = self.param("pos_embedding", partitioned(embed_init, ("length", "embed")),
                                        (self.max_len, self.width), self.param_dtype)
        if self.type_vocab_size:
            self.type_embedding = self.param("type_embedding", partitioned(embed_init, (None, "embed")),
                                             (self.type_vocab_size, self.width), self.param_dtype)
        if self.use_ln:
            self.ln = layer_norm(self.ln_epsilon, self.dtype, self.param_dtype)

    def type_rows(self, type_ids: Array | int) -> Array:
        """Rows of the type table for `type_ids` (any shape, or one int) -> [..., width] in dtype."""
        if not self.type_vocab_size:
            raise ValueError("type_rows needs type_vocab_size > 0")
        # Gathers keep the tables in param dtype; only the looked-up rows are cast.
        return jnp.take(self.type_embedding, jnp.asarray(type_ids), axis=0).astype(self.dtype)

    def __call__(self, ids: Array, type_ids: Optional[Array] = None, mask: Optional[Array] = None,
                 offset: Optional[Array] = None) -> tuple[Array, Array]:
        """ids int [B, L]; type_ids int [B, L] (default 0); mask [B, L] (1 = real; zeroes padded ids when given);
        offset: the position of ids[:, 0] (a traced int for incremental decoding; default 0)."""
        length = ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds max_len {self.max_len}")
        if mask is not None:
            real = jnp.asarray(mask) > 0
            ids = jnp.where(real, ids, 0)
            type_ids = None if type_ids is None else jnp.where(real, type_ids, 0)
        x = jnp.take(self.word_embedding, ids, axis=0).astype(self.dtype)
        positions = (self.pos_embedding[:length] if offset is None
                     else jax.lax.dynamic_slice_in_dim(self.pos_embedding, offset, length))
        x = x + positions.astype(self.dtype)[None]
        if self.type_vocab_size:
            x = x + self.type_rows(jnp.zeros_like(ids) if type_ids is None else type_ids)
        if self.use_ln:
            x = self.ln(x)
        return x, self.word_embedding


def check_text_region_batch(model: str, batch: Mapping[str, Array], required: Sequence[str], *, max_len: int,
                            region_feat_dim: int) -> tuple[int, int, int]:
    """The batch checks every words + regions model shares: `required` keys present, text_ids [B, L] with
    L <= max_len, region_feats [B, R, region_feat_dim], and the masks / boxes / type ids, where given, of matching
    shapes. Raises KeyError / ValueError naming `model`, the key and the shapes; returns (B, L, R)."""
    for key in required:
        if key not in batch:
            raise KeyError(f"{model} needs batch key {key!r}; got keys {sorted(batch)}")
    text_shape = tuple(jnp.shape(batch["text_ids"]))
    if len(text_shape) != 2:
        raise ValueError(f"batch key 'text_ids' must be [B, L]; got shape {text_shape}")
    b, length = text_shape
    if length > max_len:
        raise ValueError(f"batch key 'text_ids' has length {length} > max_len {max_len}")
    feats_shape = tuple(jnp.shape(batch["region_feats"]))
    if len(feats_shape) != 3 or feats_shape[0] != b or feats_shape[2] != region_feat_dim:
        raise ValueError(f"batch key 'region_feats' must be [B, R, region_feat_dim] = [{b}, R, {region_feat_dim}]; "
                         f"got shape {feats_shape}")
    r = feats_shape[1]
    expected = {"text_mask": ((b, length), "[B, L]"), "text_type_ids": ((b, length), "[B, L]"),
                "region_boxes": ((b, r, 4), "[B, R, 4]"), "region_mask": ((b, r), "[B, R]"),
                "region_feature_mask": ((b, r), "[B, R]")}
    for key, (shape, dims) in expected.items():
        got = None if batch.get(key) is None else tuple(jnp.shape(batch[key]))
        if got is not None and got != shape:
            raise ValueError(f"batch key {key!r} must be {dims} = {list(shape)}; got shape {got}")
    return b, length, r
