"""Scaling out on JAX's own engine: a device mesh from config, partition rules by parameter name,
and the helpers that place trees on the mesh, for one host or several.

The mesh has two axes:
  - "data": data parallel. Parameters are replicated along it; batch rows are split over it.
  - "fsdp": fully sharded data parallel. The frozen base weights, the LoRA adapters and the
    optimiser state are split over it by PARTITION_RULES; batch rows are split over it too.
Both axes consume batch rows, so every device trains per_device_train_batch_size rows (HF's
meaning) and the step's global batch is that times the device count. Communication is inserted by
XLA's SPMD partitioner, from the shardings given to jit and at the edges of the shard_maps that
batch_local builds (the gradient reduction over the batch axes, the loss head's gather), except
one all-gather written out: each decoder layer's weights, gathered from their shards inside the
layer scan (batch_local's sharded_specs), one layer at a time.

Several hosts run one process each (`initialize_distributed` below); every process builds the same
global batch from the same seed and places only the rows its devices hold.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from convert.errors import ConfigError

MESH_AXES = ("data", "fsdp")
# The batch dimension is split over both axes: data-parallel replicas and FSDP shards each take rows.
BATCH_AXES = ("data", "fsdp")

# Partition rules: (pattern over the "/"-joined parameter path, axes to try in order). The first
# pattern that matches decides; the first listed axis whose size the fsdp axis divides is sharded
# over "fsdp". A leaf that matches no rule, or none of whose axes divides, is replicated: that is
# always correct (XLA then has nothing to gather), only not memory-saving.
# Stacked layer axes are never sharded: the layer scan slices them, and a sharded layer axis would
# be gathered whole at every step of the scan. A stacked leaf shards first on axis 1, the first
# axis of one layer's slice, and a 2-D weight on axis 0: each is gathered whole where it is used
# (a layer's slice inside the layer scan, see batch_local), and XLA lays an all-gather out with its
# gathered axis most major (on a GPU it must), which for the first axis is the layout the weight
# already has. Gathered on its last axis, a slice needs a transposed copy at every use, or, if XLA
# moves that layout up to the stack, one transposed copy of the whole stacked shard.
PARTITION_RULES: tuple[tuple[str, Any], ...] = (
    # [vocab, hidden]: on hidden, so that the token lookup stays local (a vocab-sharded table would
    # make every device look up every token and sum the partial rows).
    (r"^embed$", (1, 0)),
    (r"^lm_head$", (0, 1)),  # [hidden, vocab]: on hidden, as the tied head (embed.T) is
    (r"(^|/)\w*norm$", ()),  # [layers, hidden] / [hidden]: small, replicated
    (r"/bias$", ()),  # [layers, out]: small, replicated
    (r"/lora_a$", (1,)),  # [layers, in, r]: on in
    (r"/lora_b$", (1, 2)),  # [layers, r, out]: on r, or on out where the fsdp size does not divide r
    # [layers, in, out] kernels on in, else out; any other leaf a projection holds (quantized codes
    # and their scales, [layers, n]) on its one axis.
    (r"^layers/\w+_proj/", (1, 2)),
)


# -- the mesh --------------------------------------------------------------------------------------
def validate_mesh_config(mesh: Mapping[str, Any] | None, where: str = "training.mesh") -> None:
    """Checks that need no devices: known axis names, integer sizes, at most one -1."""
    if mesh is None:
        return
    if not isinstance(mesh, Mapping):
        raise ConfigError(f"{where} must be a mapping of axis sizes like {{data: -1, fsdp: 1}}, got {mesh!r}")
    unknown = [name for name in mesh if name not in MESH_AXES]
    if unknown:
        raise ConfigError(f"{where} has unknown axis {unknown[0]!r}; the axes are {', '.join(MESH_AXES)}")
    for name, size in mesh.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ConfigError(f"{where}.{name} must be a positive integer or -1 (all remaining devices), got {size!r}")
    if sum(size == -1 for size in mesh.values()) > 1:
        raise ConfigError(f"{where} {dict(mesh)} has more than one -1; at most one axis takes the remaining devices")


def resolve_mesh_shape(mesh: Mapping[str, int] | None, device_count: int, where: str = "training.mesh") -> dict[str, int]:
    """Axis sizes with -1 filled in. The product must divide device_count; without a -1 a mesh may
    use the first product devices (multi-host runs must use them all: see make_mesh)."""
    validate_mesh_config(mesh, where)
    sizes = {name: 1 for name in MESH_AXES}
    sizes.update(mesh or {})
    fixed = int(np.prod([size for size in sizes.values() if size != -1]))
    if device_count % fixed:
        raise ConfigError(
            f"{where} {dict(mesh)} asks for {fixed} devices, but {device_count} are present and {fixed} does not "
            f"divide {device_count}; choose axis sizes whose product divides {device_count} (-1 takes the rest)"
        )
    for name, size in sizes.items():
        if size == -1:
            sizes[name] = device_count // fixed
    return sizes


def make_mesh(mesh: Mapping[str, int] | None, devices: Sequence[jax.Device] | None = None,
              where: str = "training.mesh") -> Mesh:
    """The ("data", "fsdp") mesh; None is one device. "fsdp" is the inner (fastest-varying) axis, so
    on several hosts it spans a host's own GPUs (NVLink) and "data" crosses hosts."""
    devices = list(jax.devices() if devices is None else devices)
    if mesh is None:
        if jax.process_count() > 1:
            raise ConfigError(f"{where} is not set but {jax.process_count()} processes run; set it, e.g. {{data: -1}}")
        devices = devices[:1]
    sizes = resolve_mesh_shape(mesh, len(devices), where)
    count = int(np.prod(list(sizes.values())))
    if count < len(devices) and jax.process_count() > 1:
        raise ConfigError(
            f"{where} {dict(mesh)} uses {count} of the {len(devices)} devices of this {jax.process_count()}-process "
            "run; a multi-host mesh must use every device (use -1 for one axis)"
        )
    return jax.make_mesh(
        tuple(sizes[name] for name in MESH_AXES), MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices[:count],
    )


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch rows are split: the product of the batch axes."""
    return int(np.prod([mesh.shape[name] for name in BATCH_AXES]))


def describe_mesh(mesh: Mesh) -> str:
    sizes = " x ".join(f"{name}={mesh.shape[name]}" for name in MESH_AXES)
    return f"{sizes} over {mesh.devices.size} {mesh.devices.flat[0].platform} device(s), {jax.process_count()} process(es)"


# -- partition rules -------------------------------------------------------------------------------
def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def path_name(path: Sequence[Any]) -> str:
    """'layers/q_proj/kernel' for a tree path of dict keys, attributes or indices."""
    return "/".join(_key_name(key) for key in path)


def partition_spec(name: str, shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """The PartitionSpec PARTITION_RULES give a leaf of this name and shape on an fsdp axis of fsdp_size."""
    if fsdp_size == 1 or not shape:
        return PartitionSpec()
    for pattern, axes in PARTITION_RULES:
        if re.search(pattern, name):
            break
    else:
        return PartitionSpec()
    for axis in axes:
        if axis < len(shape) and shape[axis] % fsdp_size == 0:
            return PartitionSpec(*(("fsdp" if index == axis else None) for index in range(len(shape))))
    return PartitionSpec()


def leaf_sharding(name: str, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """Where PARTITION_RULES put one leaf: e.g. for a loader placing each weight as it is read
    (jax.make_array_from_callback copies each device only its slice)."""
    return NamedSharding(mesh, partition_spec(name, shape, mesh.shape["fsdp"]))


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding per leaf of a parameter tree (base weights or LoRA adapters)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf_sharding(path_name(path), np.shape(leaf), mesh), tree)


def optimizer_state_shardings(optimizer: optax.GradientTransformation, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """The optimiser state's shardings: every parameter-shaped leaf (Adam's mu and nu) takes its
    parameter's sharding, found by optax's state-tree matching; counts and other leaves are replicated."""
    abstract_state = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_state, shardings,
        transform_non_params=lambda _: replicated,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, leading_axes: int = 1) -> NamedSharding:
    """Rows split over BATCH_AXES; leading_axes unsplit axes come first (the step's micro-batch axis)."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading_axes), BATCH_AXES))


# -- per-device computation ------------------------------------------------------------------------
def _context_mesh() -> Any:
    """The mesh jax.set_mesh put in context (the trainer traces its steps under it), if it is ours
    and we are not already inside a shard_map over it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) or set(MESH_AXES) & set(mesh.manual_axes):
        return None
    return mesh


def data_parallel_only() -> bool:
    """True under a mesh in context that splits the batch and nothing else (fsdp=1): every device
    holds every weight, so whole computations can run per device under batch_local."""
    mesh = _context_mesh()
    return mesh is not None and mesh.shape["fsdp"] == 1 and mesh.shape["data"] > 1


def weights_sharded_in_context() -> bool:
    """True under a mesh in context (not inside a shard_map over it) whose fsdp axis splits weights."""
    mesh = _context_mesh()
    return mesh is not None and mesh.shape["fsdp"] > 1


def layer_slice_specs(stacked: Any, stack_name: str) -> Any:
    """The PartitionSpec of one layer's slice of every stacked leaf of `stacked` (the layer scan's
    xs; stack_name is their path, "layers"): PARTITION_RULES' spec for the stack without its layer
    axis, on the fsdp axis of the mesh in context. For batch_local's sharded_specs."""
    fsdp_size = _context_mesh().shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: PartitionSpec(*tuple(partition_spec(
            f"{stack_name}/{path_name(path)}", np.shape(leaf), fsdp_size))[1:]), stacked)


def _gather_whole(tree: Any, specs: Any) -> Any:
    """Inside a shard_map: every leaf all-gathered whole along the axis its spec shards over fsdp."""
    def gather(leaf, spec):
        axes = [index for index, entry in enumerate(spec) if entry == "fsdp"]
        return jax.lax.all_gather(leaf, "fsdp", axis=axes[0], tiled=True) if axes else leaf

    return jax.tree.map(gather, tree, specs)


def batch_local(fn: Callable[..., Any], batched: Sequence[bool], *, sum_output: bool = False,
                rng_arg: int | None = None, sharded_specs: Mapping[int, Any] | None = None,
                gathered_name: str | None = None) -> Callable[..., Any]:
    """fn run by every device on its own rows, under jax.shard_map over the batch axes: for ops XLA
    cannot partition itself. A Pallas kernel (a custom call to XLA) would otherwise be given the
    whole batch's rows on every device; a scan over token chunks would gather every chunk.

    batched[i] says whether argument i has the rows on its leading axis (split over the batch axes)
    or is the same on every device (weights: gathered whole first, by XLA). Outputs have rows on
    their leading axis; with sum_output the output is a scalar sum over rows (a loss), and the
    devices' partial sums are added. Argument rng_arg, a PRNG key (or None), is folded with the
    device's batch-shard index, so that devices draw different dropout masks for their rows. Without
    a mesh in context (jax.set_mesh), or with rows that do not split evenly, fn runs as it is.

    sharded_specs[i], a tree of PartitionSpecs (layer_slice_specs), says how the leaves of an
    unbatched argument i are sharded: each device takes its shards in and all-gathers them whole
    inside, along the sharded axis, named gathered_name (jax.checkpoint policies can then leave
    them out of what the backward keeps, and gather again). This is FSDP's gather at the point of
    use, written out: the layer scan slices its layer of each stack, still sharded, and gathers it
    inside the loop on the 2-D slice. Left to XLA (a replicated in_spec), the partitioner gathers
    the [1, in, out] slice before the size-1 layer axis is squeezed away, layout assignment puts
    the gathered axis most major ([1, in, out]{2,0,1}), that layout travels back through the slice
    into the loop's stacked operand, and XLA copies every stacked shard to it once, before the loop:
    26 GiB of temporaries beside 42.5 GiB of weight shards, for a 44.9B model on 2 H200s."""
    sharded_specs = dict(sharded_specs or {})

    def wrapped(*args):
        mesh = _context_mesh()
        shards = 1 if mesh is None else int(np.prod([mesh.shape[name] for name in BATCH_AXES]))
        rows = [np.shape(leaf)[0] for arg, split in zip(args, batched) if split for leaf in jax.tree.leaves(arg)]
        if shards == 1 or any(count % shards for count in rows):
            return fn(*args)
        in_specs = tuple(PartitionSpec(BATCH_AXES) if split else sharded_specs.get(index, PartitionSpec())
                         for index, split in enumerate(batched))

        def local_fn(*local):
            local = list(local)
            for index, specs in sharded_specs.items():
                gathered = _gather_whole(local[index], specs)
                local[index] = gathered if gathered_name is None else checkpoint_name(gathered, gathered_name)
            if rng_arg is not None and local[rng_arg] is not None:
                local[rng_arg] = jax.random.fold_in(local[rng_arg], jax.lax.axis_index(BATCH_AXES))
            return fn(*local)
        # check_vma=False: pallas_call has no varying-axes rule on every jax version. The transpose
        # still sums the replicated arguments' cotangents over the devices (tests/test_sharding.py).
        if sum_output:
            # Each device's partial sum becomes one row of a [shards] vector; summing it outside
            # the shard_map leaves the reduction to XLA.
            partials = jax.shard_map(lambda *local: local_fn(*local)[None], in_specs=in_specs,
                                     out_specs=PartitionSpec(BATCH_AXES), check_vma=False)(*args)
            return partials.sum()
        return jax.shard_map(local_fn, in_specs=in_specs, out_specs=PartitionSpec(BATCH_AXES), check_vma=False)(*args)

    return wrapped


# -- placing trees ---------------------------------------------------------------------------------
def place(tree: Any, shardings: Any) -> Any:
    """Put every leaf onto its sharding. One process: a device_put (device to device, or a reshard).
    Several: each process passes the same host value and keeps only its devices' slices; arrays that
    already span the processes are resharded by device_put."""
    def put(leaf, sharding):
        if jax.process_count() == 1 or (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable):
            return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def place_batch(arrays: Any, sharding: NamedSharding, row_axis: int = 1) -> Any:
    """Host arrays (the same global batch on every process) onto a batch sharding. The row count must
    split evenly over the batch axes."""
    shards = int(np.prod([sharding.mesh.shape[name] for name in BATCH_AXES]))

    def put(host):
        host = np.asarray(host)
        rows = host.shape[row_axis]
        if rows % shards:
            raise ConfigError(
                f"a batch of {rows} rows does not split over the mesh's {shards} batch shards "
                f"(data x fsdp); make the global batch a multiple of {shards} "
                f"(per_device_train_batch_size is per device: the global batch is it times {shards})"
            )
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, arrays)


def abstract_like(tree: Any) -> Any:
    """jax.ShapeDtypeStruct targets carrying each leaf's sharding: what orbax restores onto, so a
    checkpoint saved on one mesh comes back laid out on another."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding), tree)


def gather_to_host(tree: Any) -> Any:
    """Every leaf as a numpy array holding the whole value, on every process. Arrays that span
    several processes are all-gathered (a collective: every process must call this)."""
    def gather(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(gather, tree)


# -- several processes -----------------------------------------------------------------------------
def is_main_process() -> bool:
    """Process 0 logs, writes metrics, plots and exports; the others only compute."""
    return jax.process_index() == 0


def main_print(*args: Any, **kwargs: Any) -> None:
    if is_main_process():
        print(*args, **kwargs)


def sync_processes(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def initialize_distributed(environ: Mapping[str, str] | None = None,
                           initialize: Callable[..., None] | None = None) -> bool:
    """jax.distributed.initialize when the environment describes a multi-process run; True if it did.

    - JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (0..N-1), one process
      per host, started by hand or by any launcher;
    - or SLURM (srun with more than one task), whose variables jax reads itself.
    Call it before anything touches a device (the CLI does it first thing)."""
    environ = os.environ if environ is None else environ
    initialize = jax.distributed.initialize if initialize is None else initialize
    if jax.distributed.is_initialized():
        return True
    coordinator = environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not environ.get(name)]
        if missing:
            raise ConfigError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not; set all three")
        try:
            num_processes, process_id = int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
        except ValueError as err:
            raise ConfigError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers ({err})") from err
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"JAX_PROCESS_ID={process_id} is not in 0..{num_processes - 1} (JAX_NUM_PROCESSES)")
        initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        return True
    if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and environ.get("SLURM_JOB_ID"):
        initialize()
        return True
    return False
