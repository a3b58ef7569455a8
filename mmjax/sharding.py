"""Device mesh, logical-axis rules and the shardings of train state and batches.

The mesh has three named axes:

    data    pure data parallelism (parameters replicated)
    fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
    tensor  Megatron-style model parallelism over heads / mlp / vocab

Each axis may also span slices (TPU slices over the data-centre network, or GPU hosts over Ethernet / IB):
`mesh.dcn_data` etc. say how many slices an axis crosses (MaxText's dcn_* knobs), `mesh.data` etc. how many devices
within a slice (ICI / NVLink). The mesh axis is then dcn x ici devices long, slowest over slices, so collectives on
the fast links stay inside a slice. Devices without a slice index (GPUs, CPUs) count each process as a slice.

Models name the axes of every parameter and activation logically (see mmjax/models/layers.py); the rules in the
config map logical names to mesh axes. Activations and parameters have separate names (activation_batch,
activation_embed, ... vs embed, mlp, ...), so a rule for one never moves the other: an activation
("activation_batch", "activation_length", "activation_embed") is split over data+fsdp on its batch, while a
parameter ("embed", "mlp") is sharded on fsdp x tensor.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes, or None). The order matters: earlier rules win a mesh axis.
DEFAULT_RULES = (
    # Activations (layers.ACT_AXES, POOLED_AXES, CACHE_AXES; the tasks' embeds). Their names differ from the
    # parameters', so these rules never move a parameter. activation_embed stays unsharded: before the split the
    # residual stream's embed never got fsdp either, as the batch had already taken it.
    ("activation_batch", BATCH_AXES),
    ("activation_heads", "tensor"),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_kv", None),
    ("activation_joint", None),
    ("activation_vocab", None),
    # Parameters.
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("joint", None),
    ("layers", None),  # the depth axis of nn.scan-stacked encoder params (Encoder(scan=True))
)


def default_mesh_config() -> ml_collections.ConfigDict:
    """Mesh sizes per axis within a slice (one may be -1 to take all remaining devices) and across slices
    (dcn_*; one may be -1 to take all remaining slices)."""
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))


def mesh_shape(mesh_config: Any, num_devices: int, prefix: str = "") -> tuple[int, ...]:
    """Resolves the -1 entry of the mesh config's `prefix`ed sizes and checks their product against num_devices
    (devices per slice for the ICI sizes, slices for prefix="dcn_")."""
    sizes = [int(mesh_config.get(prefix + a, 1) if prefix else mesh_config[a]) for a in MESH_AXES]
    described = " x ".join(f"{prefix}{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {described}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {described}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {described} does not divide the {num_devices} available devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        what = "slices" if prefix else "devices"
        raise ValueError(
            f"mesh {described} needs {math.prod(sizes)} {what} but {num_devices} are available "
            "(set one axis to -1 to fill)")
    return tuple(sizes)


def _slices(devices: Sequence[jax.Device]) -> list[list[jax.Device]]:
    """Devices grouped by slice (TPU slice_index, else the owning process), in slice order."""
    groups: dict[int, list] = {}
    for d in devices:
        # Only TPUs mean it: CPU (and some GPU) devices report slice 0 on every process.
        slice_index = getattr(d, "slice_index", None) if d.platform == "tpu" else None
        groups.setdefault(d.process_index if slice_index is None else slice_index, []).append(d)
    return [groups[k] for k in sorted(groups)]


def _device_grid(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
    """Devices of one slice in a grid of `shape`, topology-aware where the platform allows."""
    try:
        return mesh_utils.create_device_mesh(shape, list(devices))
    except (ValueError, AssertionError, NotImplementedError, AttributeError):
        # Topology-aware placement is unavailable for some device kinds (fake CPU devices, devices without coords).
        return np.asarray(devices).reshape(shape)


def create_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh described by the config over all (or the given) devices; with dcn_*
    sizes, each axis is (slices x devices per slice) long, slices outermost."""
    devices = list(jax.devices() if devices is None else devices)
    slices = _slices(devices)
    dcn = mesh_shape(mesh_config, len(slices), "dcn_") if any(
        int(mesh_config.get("dcn_" + a, 1)) != 1 for a in MESH_AXES) else (1,) * len(MESH_AXES)
    if math.prod(dcn) == 1:
        return Mesh(_device_grid(mesh_shape(mesh_config, len(devices)), devices), MESH_AXES)
    if len({len(s) for s in slices}) != 1:
        raise ValueError(f"mesh: slices of unequal size {[len(s) for s in slices]}")
    ici = mesh_shape(mesh_config, len(slices[0]))
    # [dcn..., ici...] -> interleave (dcn_0, ici_0, dcn_1, ici_1, ...) -> merge each pair: slices outermost.
    grid = np.stack([_device_grid(ici, s) for s in slices]).reshape(dcn + ici)
    n = len(MESH_AXES)
    grid = grid.transpose([i for pair in zip(range(n), range(n, 2 * n)) for i in pair])
    return Mesh(grid.reshape([d * i for d, i in zip(dcn, ici)]), MESH_AXES)


def logical_rules(rules: Any = None) -> tuple[tuple[str, Any], ...]:
    """Normalises rules from a config (lists from JSON/CLI become tuples) or returns the defaults."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch is split: data x fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of batch arrays: leading axis over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence) -> Any:
    """NamedShardings for a tree of nn.LogicallyPartitioned (or plain) leaves; plain leaves are replicated. A
    dimension the rules would split unevenly (BERT's 30,522-word vocabulary over tensor=4) stays whole instead."""
    specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, list(rules))
    shapes = jax.tree.map(lambda x: tuple(getattr(x, "shape", ())), nn.meta.unbox(boxed_tree))
    names = jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return jax.tree.map(lambda shape, name, s: _fill_fsdp(shape, name, _divisible(shape, s, mesh), mesh),
                        shapes, names, shardings, is_leaf=lambda x: isinstance(x, tuple))


def _fill_fsdp(shape: tuple, logical: tuple, named: NamedSharding, mesh: Mesh) -> NamedSharding:
    """ZeRO-3 for every parameter: one the rules leave whole on fsdp (a bias over `mlp` or `heads` when tensor=1,
    a vocabulary-sized bias) is split on fsdp along its largest free dimension that fsdp divides. Without this,
    those small replicated leaves dominate the bytes per device at 256-way FSDP. A scan's `layers` axis is never
    split (each step slices one layer)."""
    fsdp = mesh.shape.get("fsdp", 1)
    spec = list(named.spec) + [None] * (len(shape) - len(named.spec))
    axes_of = lambda axes: () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)  # noqa: E731
    if fsdp == 1 or any("fsdp" in axes_of(axes) for axes in spec):
        return named
    # A dimension on mesh axes of size 1 (`mlp` on tensor=1) is as whole as an unnamed one.
    free = [i for i, size in enumerate(shape) if math.prod(mesh.shape[a] for a in axes_of(spec[i])) == 1
            and size % fsdp == 0 and (i >= len(logical) or logical[i] != "layers")]
    if not free:
        return named
    i = max(free, key=lambda i: shape[i])
    spec[i] = (*axes_of(spec[i]), "fsdp") if spec[i] is not None else "fsdp"
    return NamedSharding(mesh, PartitionSpec(*spec))


def _divisible(shape: tuple, named: NamedSharding, mesh: Mesh) -> NamedSharding:
    """`named` with the mesh axes of every dimension they do not divide evenly dropped."""
    spec, changed = list(named.spec), False
    for i, axes in enumerate(spec):
        if axes is None or i >= len(shape):
            continue
        size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        if shape[i] % size:
            spec[i], changed = None, True
    return NamedSharding(mesh, PartitionSpec(*spec)) if changed else named


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """Raises a one-line error unless the batch splits evenly over the data-parallel degree and processes."""
    dp = data_parallel_size(mesh)
    if global_batch_size % dp:
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the data-parallel degree {dp} "
            f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the process count {jax.process_count()}")


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's numpy batch into global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def prefetch_to_mesh(batches: Iterator[dict[str, np.ndarray]], mesh: Mesh, size: int = 2
                     ) -> Iterator[dict[str, jax.Array]]:
    """Global batches `size` steps ahead: their host-to-device copies overlap the running step (dispatch is
    asynchronous), so the step never waits for its input while the host keeps up."""
    queue: collections.deque = collections.deque()
    for local in batches:
        queue.append(make_global_batch(local, mesh))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def global_numpy(local: np.ndarray, mesh: Mesh) -> np.ndarray:
    """The global batch of a per-process numpy array, in the row order of the global jax.Array, on every process."""
    arr = make_global_batch({"x": local}, mesh)["x"]
    return np.asarray(jax.jit(lambda a: a, out_shardings=replicated(mesh))(arr))


def optimizer_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of an optimizer state: a leaf whose key path ends with a parameter's path and has its shape
    (Adam's moments, ...) takes that parameter's sharding; everything else (counts, scalars) is replicated.

    Matching by path suffix, unlike optax.tree_map_params, also sees through multi_transform's masked states
    (frozen parameters), whose parameter trees hold MaskedNode placeholders.
    """
    by_path: dict[str, tuple] = {}
    for (path, leaf), shard in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings)):
        by_path[jax.tree_util.keystr(path)] = (tuple(leaf.shape), shard)

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        # The longest matching path wins: ['a']['b'] must not claim the moment of ['x']['a']['b'].
        matches = [p for p, (shape, _) in by_path.items() if key.endswith(p) and tuple(leaf.shape) == shape]
        return by_path[max(matches, key=len)][1] if matches else replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, opt_state)
