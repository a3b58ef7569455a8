"""Prediction heads shared by the multimodal models: poolers, linear classifiers (ITM, retrieval score), the answer
classifier (VQA), BERT's tied MLM head and token-prediction heads (ViLT's MPP, UNITER's MRFR / MRC, ViLBERT's MRC).

The helper functions create their submodules and parameters inside the calling Module's compact scope, under the
names they are given, so each model keeps its own parameter names (and so its checkpoint mappings): e.g.
`tied_mlm_logits` makes `mlm_transform` and `mlm_bias` directly under the model.

Logical axes: flax forbids one name twice in one array, so width x width kernels (poolers, HeadTransform) name
their output side "mlp"; class / output dims are unnamed (class counts rarely divide a mesh axis).
Head outputs are float32 (the losses' softmax / regression run in float32).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.layers import Array, Dtype, partitioned


class HeadTransform(nn.Module):
    """BERT prediction-head transform: Dense(width) -> activation -> LayerNorm (MLM and token-prediction heads).

    Parameters: dense (kernel ("embed", "mlp"), bias ("mlp",)), ln.
    """

    activation: str = "gelu"
    ln_epsilon: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., D] -> [..., D]."""
        # A square kernel cannot name "embed" twice (flax rejects repeated logical names); the hidden side takes
        # "mlp", which shards it over `tensor` like the first MLP matmul.
        x = layers.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                         kernel_init=partitioned(layers.dense_init, ("embed", "mlp")),
                         bias_init=partitioned(layers.zeros_init, ("mlp",)), name="dense")(x)
        x = layers.get_activation(self.activation)(x)
        return layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln")(x)


class AnswerClassifier(nn.Module):
    """Answer classifier on a pooled vector (ViLT's VQA head = HF ViltForQuestionAnswering's `classifier`):
    Dense(2D) -> LayerNorm -> GELU -> Dense(num_labels). Parameters: dense, ln, out."""

    num_labels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., D] -> logits [..., num_labels] (in dtype; callers cast)."""
        dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(2 * x.shape[-1], kernel_init=partitioned(layers.dense_init, ("embed", "mlp")),
                  bias_init=partitioned(layers.zeros_init, ("mlp",)), name="dense")(x)
        # torch.nn.LayerNorm's default eps: HF and the original ViLT build this LayerNorm without one, so it does not
        # follow the model's ln_epsilon. The 2D-wide hidden side is "mlp" like the kernel's output dim.
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                         scale_init=partitioned(layers.ones_init, ("mlp",)),
                         bias_init=partitioned(layers.zeros_init, ("mlp",)), name="ln")(x)
        x = layers.gelu_exact(x)  # torch nn.GELU(): exact, whatever the model's activation
        return dense(self.num_labels, kernel_init=partitioned(layers.dense_init, ("mlp", None)),
                     bias_init=partitioned(layers.zeros_init, (None,)), name="out")(x)


def pooler(x: Array, *, name: str = "pooler", features: Optional[int] = None,
           activation: Callable[[Array], Array] = jnp.tanh, dtype: Dtype = jnp.float32,
           param_dtype: Dtype = jnp.float32) -> Array:
    """BERT-style pooler in the caller's scope: activation(Dense `name`(x)); x [..., D] -> [..., features or D].

    The kernel is ("embed", "mlp"): a width x width kernel cannot name "embed" twice, so the output side is "mlp".
    """
    dense = layers.Dense(features or x.shape[-1], dtype=dtype, param_dtype=param_dtype,
                         kernel_init=partitioned(layers.dense_init, ("embed", "mlp")),
                         bias_init=partitioned(layers.zeros_init, ("mlp",)), name=name)
    return activation(dense(x))


def linear_logits(x: Array, num_outputs: int, *, name: str, dtype: Dtype = jnp.float32,
                  param_dtype: Dtype = jnp.float32) -> Array:
    """A linear head in the caller's scope: Dense `name`(num_outputs) -> float32 [..., num_outputs].

    Kernel ("embed", None), bias (None,). ViLT's retrieval score (`rank_head`, 1 output) uses it directly.
    """
    return layers.Dense(num_outputs, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=partitioned(layers.dense_init, ("embed", None)),
                        bias_init=partitioned(layers.zeros_init, (None,)), name=name)(x).astype(jnp.float32)


def itm_logits(pooled: Array, *, name: str = "itm_head", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> Array:
    """Image-text matching (binary) head: float32 logits [B, 2] = Dense `name`(2)(pooled)."""
    return linear_logits(pooled, 2, name=name, dtype=dtype, param_dtype=param_dtype)


def token_prediction(x: Array, num_outputs: int, *, prefix: str, activation: str = "gelu",
                     ln_epsilon: float = 1e-12, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> Array:
    """Per-token prediction head in the caller's scope: HeadTransform `{prefix}_transform`, then Dense
    `{prefix}_decoder`(num_outputs) -> float32 [..., num_outputs].

    ViLT's MPP (prefix "mpp": patch pixels), UNITER's MRFR ("mrfr": region features) and MRC ("mrc": region-class
    logits), ViLBERT's MRC.
    """
    h = HeadTransform(activation=activation, ln_epsilon=ln_epsilon, dtype=dtype, param_dtype=param_dtype,
                      name=f"{prefix}_transform")(x)
    return linear_logits(h, num_outputs, name=f"{prefix}_decoder", dtype=dtype, param_dtype=param_dtype)


def tied_mlm_logits(owner: nn.Module, tokens: Array, word_table: Array, *, activation: str, ln_epsilon: float,
                    dtype: Dtype, param_dtype: Dtype) -> Array:
    """BERT's MLM head inside `owner`'s compact scope: HeadTransform `mlm_transform`, then a decoder tied to
    `word_table` [V, D] plus a new bias `mlm_bias` [V] ("vocab",); float32 logits [..., V].

    Tying (no decoder kernel of its own) is BERT's / ViLT's layout, so HF checkpoints map onto it.
    """
    h = HeadTransform(activation=activation, ln_epsilon=ln_epsilon, dtype=dtype, param_dtype=param_dtype,
                      name="mlm_transform")(tokens)
    bias = owner.param("mlm_bias", partitioned(layers.zeros_init, ("vocab",)), (word_table.shape[0],), param_dtype)
    logits = layers.matmul_last(h, word_table.astype(dtype).T) + bias.astype(dtype)
    return _token_logits(logits.astype(jnp.float32))


def _token_logits(logits: Array) -> Array:
    """[B, L, V] logits kept split over the batch like every activation: otherwise, with the word table split on
    fsdp, XLA may gather the whole batch's logits on every device (ViLT-B/32, 64-way FSDP: 1.5 GiB of
    temporaries)."""
    return layers.constrain(logits, (*layers.ACT_AXES[:2], "activation_vocab")) if logits.ndim == 3 else logits


def lm_logits(owner: nn.Module, tokens: Array, vocab_size: int, word_table: Optional[Array] = None, *,
              prefix: str = "lm", dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> Array:
    """A language-model head inside `owner`'s compact scope: float32 next-token logits [..., V].

    Tied (`word_table` [V, D] given): tokens @ word_table^T + `{prefix}_bias` [V]; untied: a Dense
    `{prefix}_head` with kernel ("embed", "vocab") and bias ("vocab",).
    """
    if word_table is None:
        return layers.Dense(vocab_size, dtype=dtype, param_dtype=param_dtype,
                            kernel_init=partitioned(layers.dense_init, ("embed", "vocab")),
                            bias_init=partitioned(layers.zeros_init, ("vocab",)), name=f"{prefix}_head")(
            tokens).astype(jnp.float32)
    bias = owner.param(f"{prefix}_bias", partitioned(layers.zeros_init, ("vocab",)), (vocab_size,), param_dtype)
    return _token_logits((layers.matmul_last(tokens.astype(dtype), word_table.astype(dtype).T)
                          + bias.astype(dtype)).astype(jnp.float32))


__all__ = ["AnswerClassifier", "HeadTransform", "itm_logits", "linear_logits", "lm_logits", "pooler",
           "tied_mlm_logits", "token_prediction"]
