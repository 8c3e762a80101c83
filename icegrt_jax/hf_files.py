"""The files of an HF model directory besides its weights and config.json: the tokenizer's, and
generation_config.json (the sampling defaults ``generate`` uses). All are JSON read as data (or
copied); nothing in them is executed. ``icegrt_jax.hf`` re-exports the public names."""

from __future__ import annotations

import os
import shutil

from icegrt_jax import files
from icegrt_jax.errors import UserInputError
from icegrt_jax.models.llama_config import LlamaConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"


class CheckpointError(UserInputError):
    """An HF checkpoint directory we cannot load (missing files, tensors or wrong shapes)."""


def write_json(path: str, obj):
    """HF's JSON files: indented, keys sorted (``files.write_json``)."""
    files.write_json(path, obj, sort_keys=True)


def _read_object(path: str, what: str = "a JSON file") -> dict:
    """The JSON object in ``path``; bad JSON or another JSON value is a ``CheckpointError``."""
    obj = files.read_json(path, CheckpointError, what)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


# --- generation_config.json ----------------------------------------------------------------

def read_generation_config(directory: str) -> dict | None:
    """``directory``'s generation_config.json as a dict, None when it has none."""
    path = os.path.join(directory, GENERATION_CONFIG)
    return _read_object(path, "a generation config") if os.path.isfile(path) else None


def generation_config_dict(cfg: LlamaConfig, source: dict | None = None) -> dict:
    """generation_config.json for ``cfg``: ``source``'s settings (a converted model's sampling
    defaults: do_sample, temperature, top_p, max_length, ...) with ``cfg``'s token ids where it
    has them (its eos ids include ``source``'s: ``load_hf_config``); without ``source``, the ids."""
    ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.hf_eos_token_id, "pad_token_id": cfg.pad_token_id}
    if source is None:
        return {**ids, "_from_model_config": True}
    return {**source, **{key: value for key, value in ids.items() if value is not None}}


def carried_generation_config(source_dir: str | None, cfg: LlamaConfig) -> dict | None:
    """``save_model``'s ``extra_json`` for a model made from ``source_dir`` (an HF directory or a
    project checkpoint): its generation_config.json (``generation_config_dict``), None without one."""
    source = read_generation_config(source_dir) if source_dir is not None else None
    return {GENERATION_CONFIG: generation_config_dict(cfg, source)} if source is not None else None


# --- tokenizer files -----------------------------------------------------------------------

def save_tokenizer_files(tokenizer, directory: str, pad_token: str | None = None):
    """Copy the ``TOKENIZER_FILES`` a tokenizer directory has (at least one) or save a tokenizer
    object; ``pad_token``: named the copy's pad token (``set_pad_token``)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        for src in tokenizer_files(tokenizer, required=True):
            shutil.copy(src, directory)
    else:
        tokenizer.save_pretrained(directory)
    if pad_token is not None:
        set_pad_token(directory, pad_token)


def set_pad_token(directory: str, token: str):
    """Make ``token`` the pad token of the tokenizer files in ``directory``: in tokenizer_config.json
    (written when absent) and in special_tokens_map.json where there is one (older transformers
    let it override the former)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(directory, name)
        exists = os.path.isfile(path)
        if exists or name == "tokenizer_config.json":
            write_json(path, {**(_read_object(path) if exists else {}), "pad_token": token})


def tokenizer_files(directory: str, required: bool = False) -> list[str]:
    """The ``TOKENIZER_FILES`` present in ``directory``; with ``required``, none is an error. A JSON
    one that does not parse, or a tokenizer.json the ``tokenizers`` library cannot load, is a
    ``CheckpointError`` naming the file, so a broken tokenizer is not copied into a converted model
    and found only by a later command."""
    found = [os.path.join(directory, file) for file in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, file))]
    if required and not found:
        raise CheckpointError(f"{directory}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    for file in (f for f in found if f.endswith(".json")):
        files.read_json(file, CheckpointError)
        if os.path.basename(file) == "tokenizer.json":
            _check_fast_tokenizer(file)
    return found


def _check_fast_tokenizer(path: str):
    """Load ``path`` with ``tokenizers`` (as transformers' fast tokenizers do); a failure is one line."""
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the Rust library raises a plain Exception
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a tokenizer the tokenizers library can load ({reason})") from None
