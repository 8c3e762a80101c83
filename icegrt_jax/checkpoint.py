"""Project checkpoints (Orbax) of a model: ``DIR/config.json`` (HF-style) + ``DIR/params/`` (OCDBT).

``load_model_dir`` accepts either a project checkpoint or an HF safetensors directory, so every
command that takes ``--model DIR`` works with both.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from icegrt_jax import hf
from icegrt_jax.models.llama import LlamaConfig

PARAMS_SUBDIR = "params"


def is_project_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS_SUBDIR))


def save_model(cfg: LlamaConfig, params: nnx.State, path: str, tokenizer=None):
    """Write config.json and the Orbax params atomically (a temp dir renamed into place)."""

    def write(tmp: str):
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_SUBDIR), nnx.to_pure_dict(params))
        checkpointer.wait_until_finished()
        hf.write_json(os.path.join(tmp, "config.json"), cfg.to_hf_dict())
        if tokenizer is not None:
            hf.save_tokenizer_files(tokenizer, tmp)

    hf.atomic_directory(path, write)


def load_model(path: str, **config_overrides) -> tuple[LlamaConfig, nnx.State]:
    """Restore (config, params) written by ``save_model``, in the stored dtype unless overridden."""
    cfg = hf.load_hf_config(path, **config_overrides)
    _, abstract = hf.abstract_model(cfg)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nnx.to_pure_dict(abstract))
    pure = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, PARAMS_SUBDIR)), target)
    return cfg, hf.params_from_pure_dict(cfg, pure)


def load_model_dir(path: str, progress: bool = False, **config_overrides) -> tuple[LlamaConfig, nnx.State]:
    """(config, params) from a project checkpoint or an HF safetensors directory."""
    if is_project_checkpoint(path):
        return load_model(path, **config_overrides)
    return hf.load_hf(path, progress=progress, **config_overrides)


class TrainCheckpointer:
    """Orbax ``CheckpointManager`` for training: the state pytree (params, optimizer state, step,
    RNG) plus a JSON ``meta`` dict (data position and anything else the trainer needs to resume).

    Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it), the
    newest ``keep`` are kept, and only a finished save is ever restored.
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self._manager.save(step, args=args, force=force)

    def restore(self, abstract_state, step: int | None = None):
        """(state, meta) of ``step`` (default: the newest), shaped like ``abstract_state``."""
        step = self.latest_step() if step is None else step
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()
