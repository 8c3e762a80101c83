"""Project checkpoints (Orbax) of a model: ``DIR/config.json`` (HF-style) + ``DIR/params/`` (OCDBT),
and ``extra_json`` files (e.g. the generation_config.json ``convert`` keeps from an HF model).

``load_model_dir`` accepts either a project checkpoint or an HF safetensors directory, so every
command that takes ``--model DIR`` works with both.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import Counter

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from icegrt_jax import files, hf
from icegrt_jax.models.llama import LlamaConfig
from icegrt_jax.sharding import Partitioner, all_or_none, is_primary_process

PARAMS_SUBDIR = "params"


def is_project_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS_SUBDIR))


def save_model(cfg: LlamaConfig, params: nnx.State, path: str, tokenizer=None, kind: str = "causal_lm",
               extra_json: dict[str, dict] | None = None):
    """Write config.json, the Orbax params and ``extra_json`` files (name -> object) atomically
    (a temp dir renamed into place). A ``score`` model is marked as LlamaForSequenceClassification."""

    def write(tmp: str):
        with ocp.StandardCheckpointer() as checkpointer:  # closed, its threads done, even when a write fails
            checkpointer.save(os.path.join(tmp, PARAMS_SUBDIR), nnx.to_pure_dict(params))
            checkpointer.wait_until_finished()
        if not is_primary_process():  # the arrays are written by every process, the rest by one
            return
        hf.write_json(os.path.join(tmp, "config.json"), hf.hf_config_dict(cfg, kind))
        for name, obj in (extra_json or {}).items():
            hf.write_json(os.path.join(tmp, name), obj)
        if tokenizer is not None:
            hf.save_tokenizer_files(tokenizer, tmp)

    write_directory(path, write)


def write_directory(path: str, write):
    """``hf.atomic_directory`` for one process. With several, all of them ``write`` into one
    shared temporary directory (Orbax coordinates the array shards); once all have written, each
    syncs the tree to disk (on a shared filesystem only a file's writer can flush it), and process
    0 moves it into place and syncs the rename. Each phase ends in ``all_or_none``: a barrier at
    which a failure on any process (process 0's files, a full disk) stops every process."""
    quiet_orbax_write_failures()
    if jax.process_count() == 1:
        return hf.atomic_directory(path, write)
    path = os.path.realpath(path)
    hf.check_replaceable(path)
    tmp, old = f"{path}.tmp-shared", f"{path}.old-shared"
    primary = is_primary_process()
    with all_or_none(f"{tmp}: create"):
        if primary:
            hf.recover_replaced(path, old)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
    with all_or_none(f"{tmp}: write"):
        write(tmp)
    with all_or_none(f"{tmp}: sync"):  # nothing changes in tmp from here
        files.sync_tree(tmp)
    with all_or_none(f"{tmp}: move into place"):
        if primary:
            if os.path.exists(path):
                os.replace(path, old)
            os.replace(tmp, path)
            hf.remove_path(old)
            files.sync_path(os.path.dirname(path))


def quiet_orbax_write_failures() -> None:
    """Drop the logs of a failed Orbax write (a traceback from each background thread, and from
    asyncio for each parallel write abandoned): the save or wait that follows raises the failure as
    one line (``files.write_errors``)."""
    for name in ("absl", "asyncio"):  # the same filter is added once
        logging.getLogger(name).addFilter(_not_a_write_failure)


def _not_a_write_failure(record: logging.LogRecord) -> bool:
    """False for a log of Orbax's (absl's logger; asyncio's naming orbax) about a failed write."""
    message = record.getMessage()
    if record.name == "asyncio" and "orbax" not in message:
        return True
    return files.write_failure(record.exc_info[1] if record.exc_info else None) is None and "os_error_code=" not in message


def load_model(path: str, sharding: jax.sharding.Sharding | Partitioner | None = None,
               **config_overrides) -> tuple[LlamaConfig, nnx.State]:
    """Restore (config, params) written by ``save_model`` (a ``Llama`` or, for a saved score
    model, a ``ScoreModel``), in the stored dtype unless ``param_dtype`` is overridden, whatever
    mesh wrote the checkpoint. ``sharding``: one for every array (default: whole on this
    process's first device), or a ``Partitioner`` whose shardings lay the arrays out on its mesh
    (each process reads only the slices its devices hold)."""
    cfg = hf.load_hf_config(path, **config_overrides)
    kind = hf.read_config_kind(path)
    _, abstract = hf.abstract_model(cfg, kind)
    pure_abstract = nnx.to_pure_dict(abstract)
    if isinstance(sharding, Partitioner):
        shardings = nnx.to_pure_dict(sharding.shardings(abstract))
    else:
        one = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, pure_abstract)
    target = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          pure_abstract, shardings)
    params_dir = os.path.abspath(os.path.join(path, PARAMS_SUBDIR))
    if differs := _first_shape_difference(params_dir, pure_abstract):
        raise hf.CheckpointError(f"{path}: config.json does not describe the saved parameters ({differs})")
    try:
        pure = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:  # noqa: BLE001 - an incomplete or damaged params/: Orbax wraps TensorStore's errors
        raise hf.CheckpointError(f"{params_dir}: cannot restore the parameters ({_root_cause(e)})") from None
    return cfg, hf.params_from_pure_dict(cfg, pure, kind)


def _first_shape_difference(params_dir: str, pure_abstract) -> str | None:
    """The first array whose shape in ``params_dir``'s Orbax metadata differs from
    ``pure_abstract``'s, named by its path; checked before any array is read (then a wrong
    config.json is one clear error, not the first of many failing reads). None also when the
    metadata cannot be read: the restore then says what is wrong."""
    try:
        metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(params_dir))
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    saved = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(
        getattr(metadata, "tree", metadata), is_leaf=lambda x: hasattr(x, "shape"))}
    for path, leaf in jax.tree_util.tree_leaves_with_path(pure_abstract):
        name = jax.tree_util.keystr(path)
        if name in saved and saved[name] != tuple(leaf.shape):
            return f"{name}: saved {list(saved[name])}, config.json gives {list(leaf.shape)}"
    return None


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost error ``error`` was raised from (Orbax wraps the reader's
    error, which names the array and the damage, in a generic one)."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_model_dir(path: str, progress: bool = False, kind: str = "causal_lm", partitioner: Partitioner | None = None,
                   **config_overrides) -> tuple[LlamaConfig, nnx.State]:
    """(config, params) from a project checkpoint or an HF safetensors directory holding a model
    of ``kind`` (a ``CheckpointError`` names the mismatch otherwise): whole on the first device,
    or with a ``partitioner`` laid out on its mesh with no whole copy on any device (HF tensors
    are read into host memory, a project checkpoint is restored slice by slice)."""
    hf.check_kind(path, kind)
    if is_project_checkpoint(path):
        return load_model(path, sharding=partitioner, **config_overrides)
    cfg, params = hf.load_hf(path, progress=progress, on_host=partitioner is not None, **config_overrides)
    return cfg, params if partitioner is None else partitioner.put(params)


class TrainCheckpointer:
    """Orbax ``CheckpointManager`` for training: the state pytree (params, optimizer state, step,
    RNG) plus a JSON ``meta`` dict (data position and anything else the trainer needs to resume).

    Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it), the
    newest ``keep`` are kept, and only a finished save is ever restored.
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        quiet_orbax_write_failures()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Start saving ``step`` (asynchronously); a failed write, of this save or of the one before
        (which it waits for), is one ``CheckpointError`` naming the directory."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        with files.write_errors(self.directory, hf.CheckpointError):
            return self._manager.save(step, args=args, force=force)

    def mismatch(self, abstract_state, step: int) -> str | None:
        """Which array shapes differ between the state saved at ``step`` and ``abstract_state``
        (compared as multisets: Orbax's tree metadata need not list them in the state's order;
        dtypes may differ, the restore converts them), or None. Checked before restoring: Orbax's
        own error on a state that does not fit comes with tracebacks of its reader threads."""
        path = epath.Path(self.directory) / str(step) / "state"
        if not path.exists():
            return None
        metadata = ocp.StandardCheckpointHandler().metadata(path)
        saved, wanted = _array_counts(getattr(metadata, "tree", metadata)), _array_counts(abstract_state)
        if saved == wanted:
            return None
        describe = lambda counts: ", ".join(str(list(shape)) for shape in sorted(counts)[:2]) or "none"
        return f"saved arrays not in this run: {describe(saved - wanted)}; this run's not saved: {describe(wanted - saved)}"

    def restore(self, abstract_state, step: int | None = None, shardings=None):
        """(state, meta) of ``step`` (default: the newest), shaped like ``abstract_state`` and laid
        out by ``shardings`` (a matching tree of ``jax.sharding.Sharding``; default: the shardings
        of ``abstract_state``'s arrays, none for shapes). The mesh that wrote the checkpoint does
        not matter: each process reads the slices its devices need."""
        step = self.latest_step() if step is None else step
        def shaped(x, sharding):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        if shardings is None:
            target = jax.tree.map(lambda x: shaped(x, getattr(x, "sharding", None)), abstract_state)
        else:
            target = jax.tree.map(shaped, abstract_state, shardings)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except ValueError as e:
            if "tree structures do not match" not in str(e):
                raise
            raise StateStructureError(_structure_difference(str(e))) from None
        return restored["state"], restored["meta"]

    def wait(self):
        """Wait for the save in flight; a failed write is one ``CheckpointError`` (as in ``save``)."""
        with files.write_errors(self.directory, hf.CheckpointError):
            self._manager.wait_until_finished()

    def close(self):
        with files.write_errors(self.directory, hf.CheckpointError):
            self._manager.close()


class StateStructureError(ValueError):
    """The saved training state's tree differs from the one it is restored into (its arrays may
    all have the same shapes: an optimizer transform added or removed, e.g. gradient clipping)."""


def _structure_difference(orbax_message: str) -> str:
    """Orbax's description of a tree mismatch as one line: ``opt_state: saved (list, 3), this run
    (list, 2)`` (its "Source" is the checkpoint, its "Target" the state restored into)."""
    lines = [line.strip() for line in orbax_message.splitlines()[1:] if line.strip()]
    text = " ".join(line for line in lines if not line.startswith("If this mismatch"))
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    return text.replace("- Source:", "saved").replace("- Target:", ", this run").replace(" ,", ",")


def _array_counts(tree) -> Counter:
    """How many arrays of each shape a state (or its Orbax metadata) holds."""
    return Counter(tuple(x.shape) for x in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape")))
