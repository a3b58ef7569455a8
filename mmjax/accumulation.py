"""Gradient accumulation: the gradient of a global batch of B examples from `train.accum_steps` = k micro-batches
of B / k, one micro-batch's activations in memory at a time.

Two modes, chosen by what the task offers (`loss_and_grads`):

    GradCache   a task with `embed(params, batch, rng) -> outputs` and `loss_from_outputs(outputs, batch)` (the
                contrastive ones). Pass 1 runs the forward of every micro-batch without gradients and concatenates
                the outputs into the global batch's; the loss, its metrics and d loss / d outputs are computed on
                those, exactly as for one large batch (every in-batch negative is seen). Pass 2 reruns each
                micro-batch's forward under jax.vjp and pulls back its slice of the cached cotangents, summing
                parameter gradients in float32 (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size
                under Memory Limited Setup"; open_clip's --accum-freq). Cost: one extra forward per step.
                Exact (up to float rounding) whenever the outputs of an example do not depend on the other examples
                of its micro-batch (no batch norm) and dropout is off; with dropout each micro-batch draws its own
                mask (the same one in both passes), so only the distribution matches.
    plain       any other task: the mean over micro-batches of the loss, metrics and gradients of `task.loss`.
                Equal to the large-batch gradient only when the loss is a mean over examples with equal weight
                per micro-batch (a per-example mean, equal micro-batches). Means over masked tokens (MLM, captions)
                weight micro-batches by token count in the large batch and equally here, so they differ slightly;
                in-batch negatives (ITM) come from the micro-batch only.

Micro-batches are strided: micro-batch i holds rows i, i + k, i + 2k, ... of the batch, so with the batch sharded
over ("data", "fsdp") every device keeps B_local / k rows of every micro-batch (contiguous blocks would put
micro-batch 0 on the first devices only). The cached outputs are put back in the batch's own row order, so
`loss_from_outputs` sees the original batch.
"""

from __future__ import annotations

import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

Outputs = dict[str, jax.Array]


# ------------------------------------------------------------------------------------------------------------
# Validation.

def _data_parallel_degree(mesh: Any) -> int:
    """data x fsdp of a Mesh or AbstractMesh (1 for None or an empty mesh)."""
    if mesh is None or getattr(mesh, "empty", False):
        return 1
    shape = dict(mesh.shape)
    return int(shape.get("data", 1)) * int(shape.get("fsdp", 1))


def check_accumulation(global_batch: int, accum_steps: int, mesh: Mesh | None) -> None:
    """Raises a one-line ValueError unless `global_batch` splits into `accum_steps` micro-batches that each split
    evenly over the mesh's data-parallel degree (data x fsdp; 1 without a mesh)."""
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, numbers.Integral) or accum_steps < 1:
        raise ValueError(f"train.accum_steps must be a positive integer; got {accum_steps!r}")
    dp = _data_parallel_degree(mesh)
    if global_batch % accum_steps or (global_batch // accum_steps) % dp:
        raise ValueError(
            f"train.batch_size={global_batch} with train.accum_steps={accum_steps}: the micro-batch "
            f"(batch_size / accum_steps) must be a whole number divisible by the data-parallel degree {dp} "
            f"(mesh data x fsdp), i.e. batch_size a multiple of {accum_steps * dp}")


# ------------------------------------------------------------------------------------------------------------
# Strided micro-batches.

def _constrain_rows(x: jax.Array, axis: int) -> jax.Array:
    """Pins `axis` of x to the batch's logical axis; a no-op without logical rules (or a mesh) in context."""
    # Only a name the rules map: flax would pin an unknown name to "unsharded", replicating the whole batch.
    names = {rule[0] for rule in nn.get_logical_axis_rules()}
    batch_name = next((n for n in ("activation_batch", "batch") if n in names), None)
    if batch_name is None:
        return x
    axes = [None] * x.ndim
    axes[axis] = batch_name
    return nn.with_logical_constraint(x, tuple(axes))


def split_microbatches(tree: Any, accum_steps: int) -> Any:
    """[B, ...] leaves -> [k, B / k, ...]: micro-batch i = rows i, i + k, i + 2k, ... (each device's rows stay on
    it: a device holding rows [d B_local, (d + 1) B_local) holds B_local / k rows of every micro-batch)."""
    k = accum_steps

    def split(x):
        x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        return _constrain_rows(x, 1)

    return jax.tree.map(split, tree)


def merge_microbatches(tree: Any) -> Any:
    """Inverse of `split_microbatches`: [k, B / k, ...] -> [B, ...] in the batch's original row order."""

    def merge(x):
        x = jnp.swapaxes(x, 0, 1)
        return _constrain_rows(x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), 0)

    return jax.tree.map(merge, tree)


def _batch_size(batch: Any) -> int:
    """The common leading dimension of the batch's arrays (a one-line error if they disagree)."""
    sizes = {int(x.shape[0]) for x in jax.tree.leaves(batch) if jnp.ndim(x) > 0}
    if len(sizes) != 1:
        raise ValueError(f"every batch array must share its leading (batch) dimension; got sizes {sorted(sizes)}")
    return sizes.pop()


def _check_traced(batch: Any, accum_steps: int) -> int:
    """The batch size, checked against accum_steps and the data-parallel degree of the mesh in context."""
    size = _batch_size(batch)
    check_accumulation(size, accum_steps, jax.sharding.get_abstract_mesh())
    return size


# ------------------------------------------------------------------------------------------------------------
# Entry point.

def loss_and_grads(task: Any, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
                   accum_steps: int) -> tuple[tuple[jax.Array, dict], Any]:
    """((loss, metrics), grads) of `task` on the global batch from `accum_steps` strided micro-batches (GradCache
    when the task has `embed` and `loss_from_outputs`, else plain averaging); accum_steps=1 is value_and_grad."""
    if accum_steps == 1:
        return jax.value_and_grad(task.loss, has_aux=True)(params, batch, rng)
    _check_traced(batch, accum_steps)
    if callable(getattr(task, "embed", None)) and callable(getattr(task, "loss_from_outputs", None)):
        return gradcache_loss_and_grads(task, params, batch, rng, accum_steps)
    return plain_loss_and_grads(task, params, batch, rng, accum_steps)


# ------------------------------------------------------------------------------------------------------------
# Plain accumulation.

def _add_f32(acc: Any, x: Any) -> Any:
    """acc + x leafwise, accumulating in float32."""
    return jax.tree.map(lambda a, b: a + jnp.asarray(b, jnp.float32), acc, x)


def _zeros_f32(tree: Any) -> Any:
    """float32 zeros shaped like each leaf of a (possibly abstract) tree."""
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), tree)


def plain_loss_and_grads(task: Any, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
                         accum_steps: int) -> tuple[tuple[jax.Array, dict], Any]:
    """Mean over strided micro-batches of task.loss, its metrics (as float32) and gradients (summed in float32,
    returned in the parameters' dtypes); micro-batch i draws dropout from fold_in(rng, i)."""
    k = accum_steps
    micro = split_microbatches(batch, k)
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)

    def one(i, mb):
        mb = jax.tree.map(lambda x: _constrain_rows(x, 0), mb)
        return grad_fn(params, mb, jax.random.fold_in(rng, i))

    first = jax.tree.map(lambda x: x[0], micro)
    carry0 = _zeros_f32(jax.eval_shape(one, 0, first))

    def body(acc, xs):
        i, mb = xs
        return _add_f32(acc, one(i, mb)), None

    total, _ = jax.lax.scan(body, carry0, (jnp.arange(k), micro))
    (loss, metrics), grads = jax.tree.map(lambda x: x / k, total)
    grads = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grads, params)
    return (loss, metrics), grads


# ------------------------------------------------------------------------------------------------------------
# GradCache.

def _classify(task: Any, params: Any, batch: Any, micro: Any, rng: jax.Array) -> dict[str, str]:
    """Each top-level output key -> "rows" (per example: [n, ...] at batch size n), "shared" (the same shape at
    any batch size, e.g. logit_scale) or "drop" (anything else, e.g. [n, n] logits), from two abstract traces."""
    whole = jax.eval_shape(task.embed, params, batch, rng)
    part = jax.eval_shape(task.embed, params, jax.tree.map(lambda x: x[0], micro), rng)
    n, b = _batch_size(batch), _batch_size(jax.tree.map(lambda x: x[0], micro))
    kinds = {}
    for key in whole:
        w, p = jax.tree.leaves(whole[key]), jax.tree.leaves(part[key])
        if all(a.shape == c.shape for a, c in zip(w, p)):
            kinds[key] = "shared"
        elif all(a.ndim and a.shape[0] == n and c.shape == (b, *a.shape[1:]) for a, c in zip(w, p)):
            kinds[key] = "rows"
        else:
            kinds[key] = "drop"
    return kinds


def _differentiable(x: Any) -> bool:
    """True for floating-point (and complex) leaves: the ones that take a cotangent."""
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def gradcache_loss_and_grads(task: Any, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
                             accum_steps: int) -> tuple[tuple[jax.Array, dict], Any]:
    """GradCache: loss, metrics and d loss / d outputs on the reassembled global-batch outputs, then a scan over
    micro-batches pulling each one's slice of the output cotangents back to the parameters (summed in float32)."""
    k = accum_steps
    micro = split_microbatches(batch, k)
    kinds = _classify(task, params, batch, micro, rng)
    kept = tuple(key for key, kind in kinds.items() if kind != "drop")
    dropped = tuple(key for key, kind in kinds.items() if kind == "drop")

    def embed(p: Any, mb: Any, i: jax.Array) -> tuple[Outputs, Outputs]:
        """Micro-batch i's kept outputs, split into (differentiable, the rest); dropout from fold_in(rng, i)."""
        mb = jax.tree.map(lambda x: _constrain_rows(x, 0), mb)
        out = task.embed(p, mb, jax.random.fold_in(rng, i))
        out = {key: out[key] for key in kept}
        diff = {key: v for key, v in out.items() if all(_differentiable(x) for x in jax.tree.leaves(v))}
        return diff, {key: v for key, v in out.items() if key not in diff}

    # Pass 1: every micro-batch's outputs, no gradients (lax.map: one micro-batch's activations live at a time).
    stacked = jax.lax.map(lambda xs: jax.lax.stop_gradient(embed(params, xs[1], xs[0])), (jnp.arange(k), micro))

    def assemble(key: str, x: jax.Array) -> jax.Array:
        if kinds[key] == "rows":
            return merge_microbatches(x)
        # A batch-independent output (logit_scale, logit_bias) is the mean of its (equal) per-micro-batch values;
        # pass 2 then hands each micro-batch 1/k of its cotangent, so it is counted exactly once overall.
        if _differentiable(x):
            return jnp.mean(x.astype(jnp.float32), axis=0).astype(x.dtype)
        return x[0]

    diff = {key: jax.tree.map(lambda x, key=key: assemble(key, x), v) for key, v in stacked[0].items()}
    rest = {key: jax.tree.map(lambda x, key=key: assemble(key, x), v) for key, v in stacked[1].items()}

    def global_loss(d: Outputs) -> tuple[jax.Array, dict]:
        try:
            return task.loss_from_outputs({**d, **rest}, batch)
        except KeyError as e:  # at trace time: name the output that could not be reassembled, and why
            if e.args and e.args[0] in dropped:
                raise KeyError(f"output {e.args[0]!r} depends on which examples share a micro-batch (e.g. [b, b] "
                               "pairwise logits) and cannot be reassembled under gradient accumulation; compute it "
                               "in loss_from_outputs from the per-example outputs") from None
            raise

    (loss, metrics), d_out = jax.value_and_grad(global_loss, has_aux=True)(diff)

    # Per-micro-batch cotangents: the rows' slices in the same strided order, 1/k of a shared output's.
    d_rows = {key: split_microbatches(v, k) for key, v in d_out.items() if kinds[key] == "rows"}
    d_shared = {key: jax.tree.map(lambda g: g / k, v) for key, v in d_out.items() if kinds[key] == "shared"}

    # Pass 2: rerun each micro-batch's forward under vjp and pull back its cotangents; only one micro-batch's
    # activations (the vjp residuals) are alive at a time.
    def body(acc, xs):
        i, mb, rows_ct = xs
        out, pull, _ = jax.vjp(lambda p: embed(p, mb, i), params, has_aux=True)
        ct = {key: rows_ct[key] if kinds[key] == "rows" else d_shared[key] for key in out}
        ct = jax.tree.map(lambda c, o: c.astype(o.dtype), ct, out)  # a bfloat16 output takes a bfloat16 cotangent
        (g,) = pull(ct)
        return _add_f32(acc, g), None

    total, _ = jax.lax.scan(body, _zeros_f32(params), (jnp.arange(k), micro, d_rows))
    grads = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), total, params)
    return (loss, metrics), grads
