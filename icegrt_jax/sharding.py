"""Device meshes, logical-axis sharding of every jitted step, and the multi-process start.

Mesh. Three named axes ``(data, fsdp, tensor)`` from ``MeshConfig``; one size may be -1 (all
remaining devices). ``data`` replicates parameters, ``fsdp`` shards them (ZeRO-3: the compiler
all-gathers each layer's weights where they are used), ``tensor`` splits heads, MLP and
vocabulary (Megatron-style). Batches split over ``data`` x ``fsdp`` (the default ``batch`` rule).

Logical axes. Every parameter carries logical axis names (``nnx.Param(..., sharding_names=...)``
in ``models/llama.py``); ``MeshConfig.rules`` maps each name to mesh axes, giving a
``PartitionSpec``: ``spec(names)[i] = rules[names[i]]``. The optimizer state inherits the names
(optax's moments are tree-maps of the params, so each leaf is still an ``nnx.Param`` with the
same metadata); every other leaf (step, RNG, counters) is replicated. Batches shard their leading
axis by the ``batch`` rule; activations are constrained inside the model by
``with_logical_constraint`` (a no-op unless a ``Partitioner`` is active).

Sharding a trainer's step (the mechanism every trainer uses, see ``train/sft.py``)::

    partitioner = Partitioner.from_config(cfg.mesh)            # errors before any compilation
    partitioner.check_batch_size(cfg.data.batch_size, cfg.optimizer.grad_accum_steps)
    state = partitioner.init_state(lambda p: init_train_state(p, tx, seed), params)  # sharded
    step_fn = partitioner.jit_train_step(step, partitioner.shardings(state))
    # step(state, batch) -> (state, metrics) is the pure step; jit_train_step adds
    # in_shardings (state, batch), out_shardings (state, replicated metrics), donates the state
    # and traces under the mesh and rules so the model's activation constraints apply.
    state, metrics = step_fn(state, partitioner.shard_batch(host_batch))

Other steps (scoring rollouts, a frozen model's forward) use ``partitioner.jit`` with their
own in/out shardings; frozen parameters go onto the mesh with ``partitioner.put(params)``; a
restore lands on the mesh with ``checkpointer.restore(state, shardings=partitioner.shardings(state))``;
the sampler runs sharded when called inside ``with partitioner.activate():`` on placed params.

Multi-process. ``initialize_distributed`` starts ``jax.distributed`` (coordinator and process
ids explicit, from ``JAX_COORDINATOR_ADDRESS``, or auto-detected on SLURM / Open MPI / Cloud
TPU). Every process then runs the same program on the global mesh; each builds the same global
host batch and ``shard_batch`` hands JAX only the rows its own devices hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from icegrt_jax.config import MESH_AXES, MeshConfig
from icegrt_jax.errors import UserInputError

LOGICAL_AXES = ("batch", "length", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp",
                "layers", "norm")
CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")

Rules = Mapping[str, tuple[str, ...]]  # logical axis -> mesh axes (empty: replicated)


class ShardingError(UserInputError):
    """A mesh, rule or batch that cannot shard onto the devices at hand."""


# --- mesh ---------------------------------------------------------------------------------------

def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) with a -1 axis set to ``num_devices / product(other sizes)``.

    The product must divide ``num_devices``; the mesh then uses the first ``product`` devices.
    """
    sizes = [getattr(cfg, axis) for axis in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if num_devices % fixed:
        raise ShardingError(f"mesh ({described}) needs a multiple of {fixed} devices; "
                            f"{num_devices} devices do not divide by {fixed}")
    return tuple(num_devices // fixed if s == -1 else s for s in sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over ``devices`` (default: all, every process's)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(cfg, len(devices))
    used = math.prod(shape)
    if used < len(devices) and jax.process_count() > 1:
        raise ShardingError(f"mesh {dict(zip(MESH_AXES, shape))} uses {used} of {len(devices)} "
                            "devices; a multi-process run must use them all (set one axis to -1)")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices[:used])


# --- logical-axis rules -------------------------------------------------------------------------

def logical_rules(cfg: MeshConfig) -> dict[str, tuple[str, ...]]:
    """``MeshConfig.rules`` as {logical axis: mesh axes}; an unknown logical axis is an error."""
    rules = {}
    for logical, *axes in cfg.rules:
        if logical not in LOGICAL_AXES:
            raise ShardingError(f"mesh.rules: unknown logical axis {logical!r}; "
                                f"the model's axes are {', '.join(LOGICAL_AXES)}")
        rules[logical] = tuple(a for a in axes if a is not None)
    return rules


def logical_to_spec(names: tuple[str | None, ...], rules: Rules, what: str = "array") -> PartitionSpec:
    """``PartitionSpec`` with entry i = the mesh axes of ``names[i]`` (None: replicated)."""
    entries, used = [], set()
    for name in names:
        if name is None:
            entries.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"{what}: logical axis {name!r} has no rule in mesh.rules "
                                f"(rules exist for {', '.join(rules)})")
        axes = rules[name]
        if clash := used.intersection(axes):
            raise ShardingError(f"{what}: mesh axis {min(clash)!r} shards two dimensions "
                                f"of logical axes {names}; fix mesh.rules")
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def spec_divides(shape: tuple[int, ...], spec: PartitionSpec, mesh_sizes: Mapping[str, int]) -> list[int]:
    """The dimensions of ``shape`` that ``spec`` does not split evenly on a mesh of these sizes."""
    def ways(entry):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        return math.prod(mesh_sizes[a] for a in axes)

    return [i for i, (n, entry) in enumerate(zip(shape, spec)) if n % ways(entry)]


def with_logical_constraint(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding hint for an activation, from its logical axis names, under an active
    ``Partitioner``; the identity without one. Dimensions the mesh does not split evenly (e.g. a
    batch of 1 while sampling) are left to the compiler."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(x.shape, names, _rules_dict(rules), dict(mesh.shape)))


def activation_spec(shape: tuple[int, ...], names: tuple[str | None, ...], rules: Rules,
                    mesh_sizes: Mapping[str, int]) -> PartitionSpec:
    """``logical_to_spec`` for an activation, with ``UNCONSTRAINED`` (the compiler's choice) for
    each dimension the mesh does not split evenly."""
    spec = logical_to_spec(names, rules, "activation")
    uneven = spec_divides(shape, spec, mesh_sizes)
    return PartitionSpec(*(PartitionSpec.UNCONSTRAINED if i in uneven else e for i, e in enumerate(spec)))


def shards_alike(*names: str) -> bool:
    """Whether the active rules put the logical axes ``names`` on the same mesh axes (True without
    an active ``Partitioner``)."""
    rules = spmd.get_logical_axis_rules()
    if jax.sharding.get_abstract_mesh().empty or not rules:
        return True
    mapped = _rules_dict(rules)
    return len({mapped.get(name, ()) for name in names}) == 1


def _rules_dict(flax_rules) -> dict[str, tuple[str, ...]]:
    """flax's ``((logical, axis | axes | None), ...)`` -> {logical: axes}."""
    def axes(value):
        return () if value is None else (value,) if isinstance(value, str) else tuple(value)

    return {logical: axes(value) for logical, value in flax_rules}


# --- the partitioner ----------------------------------------------------------------------------

def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _logical_names(leaf) -> tuple | None:
    return leaf.get_metadata().get("out_sharding") if _is_variable(leaf) else None


@dataclasses.dataclass(frozen=True)
class Partitioner:
    """A mesh plus logical-axis rules: shardings of state and batches, and sharded ``jit``."""

    mesh: Mesh
    rules: Rules

    @classmethod
    def from_config(cls, cfg: MeshConfig, devices: list | None = None) -> Partitioner:
        return cls(make_mesh(cfg, devices), logical_rules(cfg))

    # shardings
    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_sharding(self) -> NamedSharding:
        """Leading (batch) axis split by the ``batch`` rule, the rest replicated."""
        return NamedSharding(self.mesh, logical_to_spec(("batch",), self.rules, "batch"))

    @property
    def data_parallel_size(self) -> int:
        """Number of batch shards: the product of the mesh axes of the ``batch`` rule."""
        return math.prod(self.mesh.shape[a] for a in self.rules.get("batch", ()))

    def spec(self, names: tuple[str | None, ...], what: str = "array") -> PartitionSpec:
        return logical_to_spec(names, self.rules, what)

    def shardings(self, tree):
        """``NamedSharding`` for every leaf of ``tree`` (same structure, ``nnx.Variable`` nodes
        kept): a variable's from its logical names, anything else replicated."""
        def sharding_of(path, leaf):
            names = _logical_names(leaf)
            if names is None:
                return leaf.replace(self.replicated) if _is_variable(leaf) else self.replicated
            what = jax.tree_util.keystr(path)
            spec = self.spec(tuple(names), what)
            if bad := spec_divides(leaf.shape, spec, dict(self.mesh.shape)):
                raise ShardingError(f"{what}: dimension {bad[0]} ({names[bad[0]]}, size "
                                    f"{leaf.shape[bad[0]]}) does not split over mesh axes "
                                    f"{spec[bad[0]]} of {dict(self.mesh.shape)}")
            return leaf.replace(NamedSharding(self.mesh, spec))

        return jax.tree_util.tree_map_with_path(sharding_of, tree, is_leaf=_is_variable)

    def check_batch_size(self, batch_size: int, accum_steps: int = 1, what: str = "data.batch_size"):
        """Raise unless each of the ``accum_steps`` micro-batches of a ``batch_size``-row batch
        splits evenly over the data-parallel shards."""
        micro, rest = divmod(batch_size, accum_steps)
        if rest:
            raise ShardingError(f"{what} {batch_size} is not divisible by grad_accum_steps {accum_steps}")
        if micro % self.data_parallel_size:
            rows = (f"{what} {batch_size}" if accum_steps == 1 else f"{what} {batch_size} / "
                    f"grad_accum_steps {accum_steps} = {micro} rows a micro-batch, which")
            raise ShardingError(f"{rows} is not divisible by the data-parallel size "
                                f"{self.data_parallel_size} (mesh {dict(self.mesh.shape)}, batch "
                                f"axes {self.rules.get('batch', ())})")

    # placing data
    def put(self, tree, shardings=None, float_dtype=None):
        """Arrays -> global arrays on the mesh. Default shardings: ``self.shardings``;
        ``float_dtype``: floating-point leaves are cast to it. Host and single-device arrays are
        copied in from the host, one leaf at a time (every process passes the same values; each
        copies only its own shards). Arrays already on the mesh are resharded and cast there (a
        multi-process global array never passes through one host), and returned as they are when
        they already have the sharding and dtype asked for."""
        shardings = self.shardings(tree) if shardings is None else shardings

        def place(value, sharding):
            value = value if hasattr(value, "dtype") else np.asarray(value)  # Python scalars
            dtype = np.dtype(value.dtype)
            if float_dtype is not None and jax.dtypes.issubdtype(dtype, np.floating):  # bfloat16 too
                dtype = np.dtype(float_dtype)
            if isinstance(value, jax.Array) and value.sharding.device_set == sharding.device_set:
                if not value.sharding.is_equivalent_to(sharding, value.ndim):
                    value = jax.device_put(value, sharding)  # any layout or device order
                return value if value.dtype == dtype else value.astype(dtype)  # cast where the shards lie
            host = np.asarray(jax.device_get(value)).astype(dtype, copy=False)  # no copy when no cast
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        return jax.tree.map(place, tree, shardings)

    def shard_batch(self, batch):
        """A global host batch (identical on every process) -> global arrays split by rows.
        Each process hands over only the rows its devices hold."""
        def shard(value):
            value = np.asarray(value)
            self.check_batch_size(value.shape[0], what="batch size")
            rows = local_rows(self.batch_sharding, value.shape)
            return jax.make_array_from_process_local_data(self.batch_sharding, value[rows], value.shape)

        return jax.tree.map(shard, batch)

    def init_state(self, init_fn: Callable, *args):
        """``init_fn(*args)`` computed directly into its sharded layout (no full copy on one device);
        ``args`` are placed with ``put`` first. The result's arrays are new (an argument returned
        as it is comes back copied), so the train steps may donate them."""
        args = self.put(args)
        abstract = jax.eval_shape(init_fn, *args)
        return self.jit(init_fn, in_shardings=self.shardings(args),
                        out_shardings=self.shardings(abstract))(*args)

    # sharded jit
    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """The mesh and rules as the context of tracing (for ``with_logical_constraint``)."""
        flax_rules = tuple((k, v if v else None) for k, v in self.rules.items())
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(flax_rules):
            yield

    def jit(self, fn: Callable, *, in_shardings, out_shardings, donate_argnums=(), static_argnums=(),
            static_argnames=()) -> ShardedFunction:
        """``jax.jit`` with explicit shardings (``in_shardings`` covers the non-static arguments),
        traced and run with this partitioner active."""
        jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                         donate_argnums=donate_argnums, static_argnums=static_argnums,
                         static_argnames=static_argnames)
        return ShardedFunction(jitted, self)

    def jit_train_step(self, step: Callable, state_shardings) -> ShardedFunction:
        """``step(state, batch) -> (state, metrics)`` sharded: state by ``state_shardings`` in and
        out (its buffers donated), batch rows split, metrics replicated."""
        return self.jit(step, in_shardings=(state_shardings, self.batch_sharding),
                        out_shardings=(state_shardings, self.replicated), donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class ShardedFunction:
    """A jitted function that traces and runs with its partitioner active."""

    jitted: Any
    partitioner: Partitioner

    def __call__(self, *args, **kwargs):
        with self.partitioner.activate():
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with self.partitioner.activate():
            return self.jitted.lower(*args, **kwargs)


def local_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> np.ndarray:
    """Indices of the rows (axis 0) that this process's devices hold, in order."""
    ranges = {index[0].indices(shape[0]) for index in sharding.addressable_devices_indices_map(shape).values()}
    return np.concatenate([np.arange(*r) for r in sorted(ranges)])


# --- multi-process ------------------------------------------------------------------------------

def wants_distributed(env: Mapping[str, str]) -> bool:
    """A multi-process launch: ``JAX_COORDINATOR_ADDRESS`` set, ``ICEGRT_DISTRIBUTED=1``, or a
    SLURM / Open MPI job with more than one task (``ICEGRT_DISTRIBUTED=0``: never). A SLURM job
    of several tasks whose process srun did not start (the batch script itself, a salloc shell:
    no ``SLURM_STEP_NODELIST``, which JAX's SLURM detection reads) is a ``ShardingError``."""
    if env.get("ICEGRT_DISTRIBUTED") == "0":
        return False
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("ICEGRT_DISTRIBUTED") == "1":
        return True
    if not any(int(env.get(name, "1")) > 1 for name in CLUSTER_SIZE_VARIABLES):
        return False
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" not in env:
        raise ShardingError(f"SLURM_NTASKS={env['SLURM_NTASKS']} but this process was not started by srun (no "
                            "SLURM_STEP_NODELIST): launch through srun (scripts/launch_slurm.sh), or set "
                            "ICEGRT_DISTRIBUTED=0 to run one process")
    return True


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: list[int] | None = None,
                           env: Mapping[str, str] | None = None) -> bool:
    """Join the multi-controller runtime (``jax.distributed``) when this is a multi-process run.

    With explicit arguments they are used as given; otherwise, when ``wants_distributed(env)``,
    JAX's own detection (SLURM, Open MPI, Cloud TPU, ``JAX_COORDINATOR_ADDRESS`` /
    ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``) fills them in. CPU processes use gloo
    collectives. Returns True when running distributed (also when already initialised).
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ if env is None else env
    explicit = coordinator_address is not None or num_processes is not None
    if not explicit and not wants_distributed(env):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes if num_processes is not None else _int_env(env, "JAX_NUM_PROCESSES"),
        process_id=process_id if process_id is not None else _int_env(env, "JAX_PROCESS_ID"),
        local_device_ids=local_device_ids)
    return True


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    return int(env[name]) if name in env else None


def is_primary_process() -> bool:
    """Process 0 writes logs, progress and config files; every process writes checkpoints."""
    return jax.process_index() == 0


def gather_flags(flag: int) -> np.ndarray:
    """Every process's ``flag`` [process_count], in process order (a collective: each process
    calls it at the same point, so it is also a barrier)."""
    if jax.process_count() == 1:
        return np.array([flag], np.int32)
    return np.ravel(multihost_utils.process_allgather(np.int32(flag)))


@contextlib.contextmanager
def all_or_none(what: str) -> Iterator[None]:
    """Run the block on every process, then ``raise_together`` on what it raised: where only some
    processes do work that can fail (process 0 writing logs or files), a failure stops all of
    them at this point instead of leaving the others in the next collective."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised by raise_together, once every process knows
        error = e
    raise_together(error, what)


def raise_together(error: BaseException | None, what: str) -> None:
    """A barrier that agrees on failure: each process passes the exception its own part of
    ``what`` met (None if none); when any process met one, every process raises, its own or one
    naming the process that failed (a ``UserInputError`` when that process's was one, so every
    process exits 2 with one line), instead of the others waiting for it in the next collective."""
    failed = gather_flags(0 if error is None else 2 if isinstance(error, UserInputError) else 1)
    if error is not None:
        raise error
    if failed.any():
        first = int(np.argmax(failed > 0))
        kind = UserInputError if failed[first] == 2 else RuntimeError
        raise kind(f"{what}: process {first} failed (its error says why)")
