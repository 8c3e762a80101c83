"""Model set-up shared by the trainers: an HF/project checkpoint or a preset initialised at random."""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from icegrt_jax.checkpoint import load_model_dir
from icegrt_jax.config import ConfigError, ModelConfig
from icegrt_jax.data.tokenize import load_tokenizer
from icegrt_jax.models.llama import Llama, LlamaConfig, preset
from icegrt_jax.sharding import Partitioner


def existing_directory(key: str, path: str) -> str:
    """``path``; a ``ConfigError`` naming the config ``key`` when it is not a directory."""
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: {path}: no such directory")
    return path


def run_tokenizer(cfg):
    """A trainer's tokenizer: ``data.tokenizer_path``, else ``model.hf_path``'s. Checks first that
    the configured model (and tokenizer) directories exist, naming the key of a missing one."""
    if cfg.model.hf_path is not None:
        existing_directory("model.hf_path", cfg.model.hf_path)
    if cfg.data.tokenizer_path is not None:
        return load_tokenizer(existing_directory("data.tokenizer_path", cfg.data.tokenizer_path))
    return load_tokenizer(cfg.model.hf_path)


def with_numerics(base: LlamaConfig, cfg: ModelConfig) -> LlamaConfig:
    """``base`` with the run's numerics: ``cfg``'s dtypes, layer scan and remat."""
    return base.replace(dtype=cfg.dtype, param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers, remat=cfg.remat)


def model_config(cfg: ModelConfig, base: LlamaConfig) -> LlamaConfig:
    """``base`` with the config's numerics and architecture overrides applied."""
    return with_numerics(base, cfg).replace(**cfg.architecture_overrides())


def init_model(cfg: ModelConfig, seed: int, partitioner: Partitioner, min_vocab: int | None = None,
               progress: bool = False) -> tuple[LlamaConfig, nnx.State]:
    """(config, params) from ``hf_path`` (HF or project checkpoint) or a random ``preset``, laid
    out on ``partitioner``'s mesh: no device ever holds a whole copy that the mesh splits (a
    checkpoint is read through host memory or slice by slice; a random model is initialised
    straight into its shards).

    ``min_vocab`` (the tokenizer's size) must fit in the model's vocabulary; ``progress`` shows
    a bar while a checkpoint loads.
    """
    if cfg.hf_path is not None:
        if overrides := cfg.architecture_overrides():
            raise ConfigError(f"model.{next(iter(overrides))}: architecture overrides apply only with model.preset")
        loaded, params = load_model_dir(cfg.hf_path, progress=progress, partitioner=partitioner,
                                        param_dtype=cfg.param_dtype)
        llama = model_config(cfg, loaded)
    else:
        llama = model_config(cfg, preset(cfg.preset))
        params = None
    if min_vocab is not None and llama.vocab_size < min_vocab:
        raise ConfigError(f"model.vocab_size: {llama.vocab_size} is smaller than the tokenizer's {min_vocab} tokens")
    if params is None:
        params = partitioner.init_state(lambda: nnx.split(Llama(llama, nnx.Rngs(seed)))[1])
    return llama, params


def frozen_config(llama: LlamaConfig) -> LlamaConfig:
    """A frozen role's numerics (PPO's reference and reward model): weights stored in the compute
    dtype where it is narrower than ``param_dtype``. Every forward casts each weight to the
    compute dtype before use, so the outputs are bitwise the same, in half the memory for bf16
    compute over fp32 master weights (which only the trained roles need)."""
    if jnp.dtype(llama.dtype).itemsize < jnp.dtype(llama.param_dtype).itemsize:
        return llama.replace(param_dtype=llama.dtype)
    return llama


def place_frozen(partitioner: Partitioner, params, llama: LlamaConfig):
    """A frozen role's ``params`` on the mesh in ``frozen_config(llama)``'s dtype (``put``: cast
    where they already are; the same arrays when nothing changes)."""
    return partitioner.put(params, float_dtype=jnp.dtype(frozen_config(llama).param_dtype))
