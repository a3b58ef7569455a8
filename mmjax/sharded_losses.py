"""Contrastive losses over the global batch whose per-device memory shrinks as the batch is spread wider.

Same values and gradients as losses.softmax_contrastive_loss / sigmoid_contrastive_loss on the same global batch,
but written per device under jax.shard_map, so no device ever holds the [B, B] logits:

    softmax_contrastive_loss_sharded   one [B_local, B_global] block per device (the other modality gathered)
    sigmoid_contrastive_loss_chunked   SigLIP's chunked scheme: [B_local, B_local] blocks, texts passed on a ring
    contrastive_metrics_sharded        losses.contrastive_metrics in [B_local, B_local] blocks on the same ring

The batch is split over the mesh's batch axes (sharding.BATCH_AXES: data x fsdp); other axes (tensor) hold
replicas. B_global must divide by the data-parallel degree (sharding.check_batch_size).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from mmjax.sharding import BATCH_AXES

Array = jax.Array


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh's axes that split the batch, in BATCH_AXES order (the order the batch sharding uses)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def _ring_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    """How many ways the batch is split (devices on the ring)."""
    return math.prod(mesh.shape[a] for a in axes)


def _shard(fn, mesh: Mesh, n_scalars: int):
    """fn(x, y, *scalars) per device: embeddings row-split over the batch axes, scalars replicated."""
    rows = PartitionSpec(_batch_axes(mesh))
    return jax.shard_map(fn, mesh=mesh, in_specs=(rows, rows) + (PartitionSpec(),) * n_scalars,
                         out_specs=PartitionSpec())


def _f32(x) -> Array:
    """The losses compute in float32 whatever the embeddings' dtype (as losses._logits does)."""
    return jnp.asarray(x, jnp.float32)


def softmax_contrastive_loss_sharded(image_embeds: Array, text_embeds: Array, logit_scale: Array,
                                     mesh: Mesh) -> Array:
    """Symmetric InfoNCE equal to losses.softmax_contrastive_loss, each device holding only its
    [B_local, B_global] logits (its images against all texts); image/text_embeds [B, E], logit_scale a scalar."""
    axes = _batch_axes(mesh)
    b_global = image_embeds.shape[0]

    def local(x, y, scale):
        # float32 before the gather: the gather's transpose (a reduce-scatter of the texts' gradient) then sums
        # in float32, as the dense loss does.
        x, y, scale = _f32(x), _f32(y), _f32(scale)
        n = x.shape[0]
        logits = scale * jnp.einsum("id,jd->ij", x, jax.lax.all_gather(y, axes, tiled=True))  # [n, B_global]
        offset = jax.lax.axis_index(axes) * n  # my rows' global index = their positives' column
        diag = jnp.take_along_axis(logits, (offset + jnp.arange(n))[:, None], axis=1)[:, 0]
        row_lse = jax.nn.logsumexp(logits, axis=1)
        # text->image needs each column's log-sum-exp over every device's rows: combine the per-device sums
        # around the global column max (stop_gradient: the max cancels out of the value, so it takes none).
        col_max = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=0)), axes)
        col_lse = col_max + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - col_max), axis=0), axes))
        my_col_lse = jax.lax.dynamic_slice_in_dim(col_lse, offset, n)  # only my positives' columns: no double count
        total = jnp.sum(row_lse - diag) + jnp.sum(my_col_lse - diag)
        return jax.lax.psum(total, axes) / (2.0 * b_global)

    return _shard(local, mesh, 1)(image_embeds, text_embeds, logit_scale)


def sigmoid_contrastive_loss_chunked(image_embeds: Array, text_embeds: Array, logit_scale: Array,
                                     logit_bias: Array, mesh: Mesh) -> Array:
    """SigLIP's loss equal to losses.sigmoid_contrastive_loss, computed in [B_local, B_local] blocks: each device's
    images meet its own texts (positives on the diagonal), then every other device's texts, passed on a ring."""
    axes = _batch_axes(mesh)
    size = _ring_size(mesh, axes)
    b_global = image_embeds.shape[0]

    def local(x, y, scale, bias):
        x, y, scale, bias = _f32(x), _f32(y), _f32(scale), _f32(bias)

        def block(y_blk, z):  # -sum log sigmoid(z * logits) of one [n, n] block
            logits = scale * jnp.einsum("id,jd->ij", x, y_blk) + bias
            return -jnp.sum(jax.nn.log_sigmoid(z * logits))

        # Remat: the backward recomputes each block from the saved [n, E] text block instead of keeping n x n
        # residuals for every ring step (which would add up to the B_local x B_global this scheme avoids).
        negatives = jax.checkpoint(lambda y_blk: block(y_blk, -1.0))
        total = block(y, 2.0 * jnp.eye(x.shape[0], dtype=jnp.float32) - 1.0)
        if size > 1:
            ring = [(i, (i + 1) % size) for i in range(size)]

            def step(y_blk, _):
                y_blk = jax.lax.ppermute(y_blk, axes, ring)
                return y_blk, negatives(y_blk)

            # scan, not a Python loop: the steps run one after another, so one block is alive at a time.
            _, parts = jax.lax.scan(step, y, None, length=size - 1)
            total = total + jnp.sum(parts)
        return jax.lax.psum(total, axes) / b_global

    return _shard(local, mesh, 2)(image_embeds, text_embeds, logit_scale, logit_bias)


def contrastive_metrics_sharded(image_embeds: Array, text_embeds: Array, mesh: Mesh) -> dict[str, Array]:
    """losses.contrastive_metrics (top-1 in-batch i2t_acc, t2i_acc; ties to the lowest index) in [B_local,
    B_local] blocks: images and texts both travel the ring, each device keeping its rows' best match so far."""
    axes = _batch_axes(mesh)
    size = _ring_size(mesh, axes)
    b_global = image_embeds.shape[0]

    def local(x, y):
        x, y = jax.lax.stop_gradient(_f32(x)), jax.lax.stop_gradient(_f32(y))
        n = x.shape[0]
        me = jax.lax.axis_index(axes)
        ring = [(i, (i + 1) % size) for i in range(size)]

        def better(best, sim, owner):  # (value, global index) of each row's max so far, merged with this block
            val, idx = jnp.max(sim, axis=1), jnp.argmax(sim, axis=1) + owner * n
            # Blocks arrive out of index order: on a tie keep the lower index, as argmax over the full row does.
            take = (val > best[0]) | ((val == best[0]) & (idx < best[1]))
            return jnp.where(take, val, best[0]), jnp.where(take, idx, best[1])

        def step(k, carry):
            x_blk, y_blk, i2t, t2i = carry
            x_blk, y_blk = jax.lax.ppermute((x_blk, y_blk), axes, ring)
            owner = (me - k) % size  # whose rows arrived after k hops
            i2t = better(i2t, jnp.einsum("id,jd->ij", x, y_blk), owner)
            t2i = better(t2i, jnp.einsum("jd,id->ji", y, x_blk), owner)
            return x_blk, y_blk, i2t, t2i

        start = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.int32))
        carry = (x, y, better(start, jnp.einsum("id,jd->ij", x, y), me),
                 better(start, jnp.einsum("jd,id->ji", y, x), me))
        if size > 1:  # fori_loop: one hop after another, one pair of blocks alive at a time
            carry = jax.lax.fori_loop(1, size, step, carry)
        _, _, (_, i2t), (_, t2i) = carry
        target = me * n + jnp.arange(n)
        count = lambda idx: jax.lax.psum(jnp.sum((idx == target).astype(jnp.float32)), axes) / b_global
        return {"i2t_acc": count(i2t), "t2i_acc": count(t2i)}

    return _shard(local, mesh, 0)(image_embeds, text_embeds)
