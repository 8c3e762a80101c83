"""HuggingFace LLaMA checkpoints (safetensors) <-> our parameters, through one declarative table.

Two model kinds: ``causal_lm`` (``Llama`` <-> ``LlamaForCausalLM``) and ``score`` (``ScoreModel``,
the reward model and critic <-> ``LlamaForSequenceClassification`` with ``num_labels=1``: no
``lm_head``, ``score.weight`` [1, H]). config.json's ``architectures`` says which.

Each row of ``NAME_TABLE`` maps an HF tensor name (a regex; ``(\\d+)`` is the layer index) to our
parameter path and a layout transform. Layer tensors are stacked on our leading ``layers`` axis.
HF stores ``nn.Linear`` weights as [out, in]; we store ``x @ W`` kernels with heads split out.
HF's q/k projections are already in the rotate-half RoPE layout we use, so no permutation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from icegrt_jax import files
from icegrt_jax.hf_files import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    CheckpointError,
    carried_generation_config,
    generation_config_dict,
    read_generation_config,
    save_tokenizer_files,
    set_pad_token,
    tokenizer_files,
    write_json,
)
from icegrt_jax.models.heads import ScoreModel
from icegrt_jax.models.llama import Llama
from icegrt_jax.models.llama_config import (
    DTYPES,
    LlamaConfig,
    ModelConfigError,
    read_config_json,
)
from icegrt_jax.safetensors_io import (
    SafetensorsError,
    SafetensorsFile,
    write_safetensors,
)

log = logging.getLogger(__name__)

FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float16, np.float32, np.float64, jnp.bfloat16))  # stored weights

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Buffers some LLaMA-1 conversions saved; they are recomputed, never loaded.
IGNORED_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclass(frozen=True)
class Layout:
    """A pair of inverse transforms between the HF tensor and our parameter (per layer)."""

    to_ours: Callable[[np.ndarray, LlamaConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, LlamaConfig], np.ndarray]


IDENTITY = Layout(lambda w, c: w, lambda w, c: w)
SCORE_ROW = Layout(lambda w, c: w.reshape(c.hidden_size), lambda w, c: w.reshape(1, c.hidden_size))
TRANSPOSE = Layout(lambda w, c: w.T, lambda w, c: w.T)
Q_HEADS = Layout(  # [N*D, H] <-> [H, N, D]
    lambda w, c: w.T.reshape(c.hidden_size, c.num_heads, c.head_dim),
    lambda w, c: w.reshape(c.hidden_size, -1).T,
)
KV_HEADS = Layout(  # [K*D, H] <-> [H, K, D]
    lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
    lambda w, c: w.reshape(c.hidden_size, -1).T,
)
O_HEADS = Layout(  # [H, N*D] <-> [N, D, H]
    lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
    lambda w, c: w.reshape(-1, c.hidden_size).T,
)

_LAYER = r"model\.layers\.(\d+)\."
NAME_TABLE: tuple[tuple[str, tuple[str, ...], Layout], ...] = (
    (r"model\.embed_tokens\.weight", ("embed",), IDENTITY),
    (r"model\.norm\.weight", ("final_norm",), IDENTITY),
    (r"lm_head\.weight", ("lm_head",), TRANSPOSE),
    (r"score\.weight", ("score",), SCORE_ROW),
    (_LAYER + r"input_layernorm\.weight", ("layers", "attn_norm"), IDENTITY),
    (_LAYER + r"self_attn\.q_proj\.weight", ("layers", "wq"), Q_HEADS),
    (_LAYER + r"self_attn\.k_proj\.weight", ("layers", "wk"), KV_HEADS),
    (_LAYER + r"self_attn\.v_proj\.weight", ("layers", "wv"), KV_HEADS),
    (_LAYER + r"self_attn\.o_proj\.weight", ("layers", "wo"), O_HEADS),
    (_LAYER + r"post_attention_layernorm\.weight", ("layers", "mlp_norm"), IDENTITY),
    (_LAYER + r"mlp\.gate_proj\.weight", ("layers", "w_gate"), TRANSPOSE),
    (_LAYER + r"mlp\.up_proj\.weight", ("layers", "w_up"), TRANSPOSE),
    (_LAYER + r"mlp\.down_proj\.weight", ("layers", "w_down"), TRANSPOSE),
)


def hf_name(pattern: str, layer: int | None) -> str:
    """Concrete HF tensor name of a table pattern (layer index substituted)."""
    name = pattern.replace(r"(\d+)", str(layer)) if layer is not None else pattern
    return name.replace("\\", "")


def expected_hf_tensors(cfg: LlamaConfig, kind: str = "causal_lm") -> dict[str, tuple[tuple[str, ...], Layout, int | None]]:
    """Every HF tensor name the config and model kind imply -> (our path, layout, layer index or None)."""
    expected = {}
    for pattern, path, layout in NAME_TABLE:
        if path == ("lm_head",) and (cfg.tie_word_embeddings or kind == "score"):
            continue
        if path == ("score",) and kind != "score":
            continue
        layers = range(cfg.num_layers) if path[0] == "layers" else [None]
        for layer in layers:
            expected[hf_name(pattern, layer)] = (path, layout, layer)
    return expected


# --- params <-> pure dicts --------------------------------------------------------------------

MODEL_KINDS = {"causal_lm": Llama, "score": ScoreModel}
HF_ARCHITECTURES = {"causal_lm": "LlamaForCausalLM", "score": "LlamaForSequenceClassification"}


def model_kind_of_config(config: dict, source: str = "config.json") -> str:
    """"score" when an HF config.json dict names LlamaForSequenceClassification, else "causal_lm"."""
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise CheckpointError(f"{source}: architectures must be a list of class names, got {architectures!r}")
    return "score" if HF_ARCHITECTURES["score"] in architectures else "causal_lm"


def hf_config_dict(cfg: LlamaConfig, kind: str = "causal_lm") -> dict:
    """config.json for the model of ``kind`` (a score model: one label)."""
    config = cfg.to_hf_dict()
    if kind == "score":
        config.update(architectures=[HF_ARCHITECTURES["score"]], num_labels=1, id2label={"0": "LABEL_0"},
                      label2id={"LABEL_0": 0})
    return config


def read_config_kind(path: str) -> str:
    """The model kind of the checkpoint directory ``path`` (from its config.json); a missing
    directory, config.json or bad JSON is a one-line error."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path) and os.path.isdir(os.path.join(path, "final")):
        raise CheckpointError(f"{path}: a training run, not a model; its trained model is {os.path.join(path, 'final')}")
    return model_kind_of_config(read_config_json(config_path), config_path)


def check_kind(path: str, expected: str):
    """A ``CheckpointError`` unless ``path`` holds a model of kind ``expected`` (e.g. a reward
    model where a policy belongs, or the reverse)."""
    found = read_config_kind(path)
    if found != expected:
        raise CheckpointError(f"{path}: holds a {HF_ARCHITECTURES[found]}; a {HF_ARCHITECTURES[expected]} "
                              "is expected here")


def abstract_model(cfg: LlamaConfig, kind: str = "causal_lm"):
    """(graphdef, abstract state) of ``Llama(cfg)`` (or ``ScoreModel`` for kind "score"),
    without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: MODEL_KINDS[kind](cfg, nnx.Rngs(0))))


def params_from_pure_dict(cfg: LlamaConfig, pure: dict, kind: str = "causal_lm") -> nnx.State:
    """An ``nnx.State`` for the model of ``kind`` holding the arrays of ``pure``."""
    _, state = abstract_model(cfg, kind)
    nnx.replace_by_pure_dict(state, pure)
    return state


def model_from_params(cfg: LlamaConfig, params: nnx.State, kind: str = "causal_lm"):
    """Rebuild the NNX module from its parameters (``nnx.merge`` with an abstract graphdef)."""
    graphdef, _ = abstract_model(cfg, kind)
    return nnx.merge(graphdef, params)


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


# --- load ----------------------------------------------------------------------------------

def _tensor_index(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file, from the index (sharded) or the single file."""
    index_path = os.path.join(path, SAFE_INDEX)
    if os.path.exists(index_path):
        index = files.read_json(index_path, CheckpointError, "a safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: corrupted index (expected a 'weight_map' object of file names)")
        if outside := sorted({f for f in weight_map.values() if os.path.isabs(f) or os.path.normpath(f).startswith("..")}):
            raise CheckpointError(f"{index_path}: weight_map names files outside the model directory: {outside[0]}")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, SAFE_SINGLE)
    if os.path.exists(single):
        return {name: single for name in SafetensorsFile(single)}
    found = ", ".join(sorted(os.listdir(path))) or "nothing"
    raise CheckpointError(
        f"{path}: no {SAFE_SINGLE} or {SAFE_INDEX} (found: {found}); only safetensors weights are loaded"
    )


def _redundant_tied_head(cfg: LlamaConfig, kind: str, index: dict[str, str]) -> set[str]:
    """{"lm_head.weight"} when a checkpoint with tied embeddings also stores its LM head, equal
    to the embedding (transformers ignores it on load); a different one stays unexpected."""
    names = ("lm_head.weight", "model.embed_tokens.weight")
    if not (cfg.tie_word_embeddings and kind == "causal_lm" and all(n in index for n in names)):
        return set()
    head, embed = (SafetensorsFile(index[n]).get(n) for n in names)
    return {names[0]} if head.shape == embed.shape and np.array_equal(head, embed) else set()


def _check_names(path: str, found: set[str], expected: set[str]):
    missing = sorted(expected - found)
    unexpected = sorted(n for n in found - expected if not IGNORED_TENSORS.fullmatch(n))
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {', '.join(missing)}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors: {', '.join(unexpected)}")


def _open_and_check_shapes(cfg, index, expected, pure) -> dict[str, SafetensorsFile]:
    """Open every shard and check every tensor's shape before any data is read."""
    files: dict[str, SafetensorsFile] = {}
    for name, (ours, layout, layer) in expected.items():
        file = index[name]
        if file not in files:
            if not os.path.exists(file):
                raise CheckpointError(f"{file}: shard named in the index is missing")
            files[file] = SafetensorsFile(file)
        if name not in files[file]:
            raise CheckpointError(f"{file}: missing tensor {name} (listed in the index)")
        target = _get(pure, ours)
        slot_shape = target.shape[1:] if layer is not None else target.shape
        want = tuple(layout.to_hf(np.empty(slot_shape, np.int8), cfg).shape)
        got = tuple(files[file].shape(name))
        if got != want:
            raise CheckpointError(f"{file}: tensor {name} has shape {got}, expected {want}")
        if files[file].dtype(name) not in FLOAT_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} is {files[file].dtype(name)}, expected a floating-point type")
    return files


def load_hf_config(path: str, **overrides) -> LlamaConfig:
    """The model config of an HF (or project) directory: config.json, plus the eos ids its
    generation_config.json adds (what transformers' ``generate`` stops at, e.g. a chat model's
    end-of-turn token)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    cfg = LlamaConfig.from_json_file(os.path.join(path, "config.json"), **overrides)
    eos = (read_generation_config(path) or {}).get("eos_token_id")
    ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if ids is None:
        return cfg
    if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise CheckpointError(f"{os.path.join(path, GENERATION_CONFIG)}: eos_token_id must be a token id or a "
                              f"list of them, got {eos!r}")
    return cfg.replace(extra_eos_token_ids=cfg.extra_eos_token_ids + tuple(ids))


def load_hf(path: str, progress: bool = False, on_host: bool = False,
            **config_overrides) -> tuple[LlamaConfig, nnx.State]:
    """Load an HF LLaMA directory (config.json + safetensors, single or sharded) -> (config, params)
    of a ``Llama`` (LlamaForCausalLM) or a ``ScoreModel`` (LlamaForSequenceClassification).

    Tensors are memory-mapped and copied one at a time into the stacked layout in host memory,
    then onto the default device (``on_host``: left on the host as numpy arrays, for
    ``Partitioner.put`` to hand each device its shards). Parameters keep the checkpoint's
    ``torch_dtype`` unless ``param_dtype`` is overridden.
    """
    cfg = load_hf_config(path, **config_overrides)
    kind = read_config_kind(path)
    index = _tensor_index(path)
    expected = expected_hf_tensors(cfg, kind)
    _check_names(path, set(index) - _redundant_tied_head(cfg, kind, index), set(expected))
    _, abstract = abstract_model(cfg, kind)
    pure = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), nnx.to_pure_dict(abstract))
    files = _open_and_check_shapes(cfg, index, expected, pure)
    for name in tqdm(sorted(expected), desc=f"load {os.path.basename(path)}", disable=not progress):
        ours, layout, layer = expected[name]
        target = _get(pure, ours)
        value = layout.to_ours(files[index[name]].get(name), cfg).astype(target.dtype)
        if layer is None:
            target[...] = value
        else:
            target[layer] = value
    return cfg, params_from_pure_dict(cfg, pure if on_host else jax.tree.map(jnp.asarray, pure), kind)


# --- save ----------------------------------------------------------------------------------

def hf_tensors(cfg: LlamaConfig, params: nnx.State, kind: str = "causal_lm") -> dict[str, np.ndarray]:
    """Our parameters as HF-named numpy tensors (the table read backwards), dtype kept."""
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    out = {}
    for name, (ours, layout, layer) in expected_hf_tensors(cfg, kind).items():
        value = np.asarray(_get(pure, ours))
        value = value if layer is None else value[layer]
        out[name] = np.ascontiguousarray(layout.to_hf(value, cfg))
    return out


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name in sorted(tensors, key=_natural_key):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current]


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def scoring_config(cfg: LlamaConfig, tokenizer=None) -> tuple[LlamaConfig, str | None]:
    """(config, pad token) a score model is exported with. transformers'
    LlamaForSequenceClassification scores the last token that is not ``pad_token_id`` (it ignores
    the attention mask), so the export names the id the reward trainer padded with: the
    ``tokenizer``'s (a directory or a tokenizer: its pad, else unk, else eos), else the config's
    when it is a token id (LLaMA-1's -1 is none: transformers would score the last padding slot).
    The pad token is that id's token where the tokenizer pads with another or none (the exported
    tokenizer must pad with the id the model skips: padding with EOS, the usual fix for a
    tokenizer without one, would have it score a padding slot), else None. A note on stderr when
    that id is the EOS (transformers then scores the token before a final EOS, where we score the
    EOS) or when there is none (transformers refuses batches of more than one)."""
    from icegrt_jax.data.tokenize import load_tokenizer, pad_token_id

    pad_token = None
    if tokenizer is not None:
        loaded = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        cfg = cfg.replace(pad_token_id=pad_token_id(loaded))
        if loaded.pad_token_id != cfg.pad_token_id:
            pad_token = loaded.convert_ids_to_tokens(cfg.pad_token_id)
    elif cfg.pad_token_id is not None and cfg.pad_token_id < 0:
        cfg = cfg.replace(pad_token_id=None)
    if cfg.pad_token_id is None:
        print("note: no pad token id (no tokenizer given): transformers will only score one sequence at a time",
              file=sys.stderr)
    elif cfg.pad_token_id == cfg.eos_token_id:
        print("note: the pad id is the EOS id: transformers' LlamaForSequenceClassification scores the token "
              "before a final EOS, icegrt scores the EOS", file=sys.stderr)
    return cfg, pad_token


def check_replaceable(path: str):
    """Raise unless ``path`` is absent, an empty directory or a model directory (has config.json):
    a model is written over whole, and any other directory would be lost with it. A symbolic link
    is followed (``atomic_directory`` writes where it points)."""
    path = os.path.realpath(path)
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: exists and is not a directory; choose another output path")
    if os.listdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: exists and is not a model directory (no config.json); refusing to "
                              "replace it: remove it or choose another output path")


def _temporary_prefix(path: str, kind: str = "tmp") -> str:
    """``path.tmp-<host>-``: with the writer's pid appended, its temporary directory (``kind``
    "old": where the model it replaces waits until the new one is in place)."""
    return f"{path}.{kind}-{socket.gethostname()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _left_by_dead_writers(path: str, kind: str) -> list[str]:
    """The ``kind`` directories of ``atomic_directory(path)`` whose writer (a process of this host)
    is gone; other hosts' are left alone."""
    parent, name = os.path.split(_temporary_prefix(path, kind))
    try:
        entries = os.listdir(parent) if os.path.isdir(parent) else []
    except OSError:  # an unlistable parent: nothing we can clean
        entries = []
    pids = {entry: entry[len(name):] for entry in entries if entry.startswith(name)}
    return [os.path.join(parent, entry) for entry, pid in pids.items()
            if pid.isascii() and pid.isdigit() and not _process_alive(int(pid))]


def recover_replaced(path: str, old: str) -> None:
    """A write killed between moving the model at ``path`` aside to ``old`` and moving the new one
    in: put the old model back when ``path`` is missing or an empty directory; remove ``old`` when
    ``path`` holds a model again (config.json); otherwise leave it and say where it is."""
    if not os.path.lexists(old):
        return
    if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
    if not os.path.lexists(path):
        os.replace(old, path)
        log.warning("restored %s from %s: an earlier write of it was interrupted", path, old)
    elif os.path.isfile(os.path.join(path, "config.json")):
        remove_path(old)
        log.warning("removed %s, the model an interrupted earlier write replaced at %s", old, path)
    else:
        log.warning("%s holds the model an interrupted earlier write of %s replaced; left in place", old, path)


def remove_stale_temporaries(path: str) -> list[str]:
    """Clean up after writes of ``path`` (``atomic_directory``) that a killed process of this host
    left: remove their temporary directories, and put back (``recover_replaced``) a model one had
    moved aside; return the temporary directories removed."""
    stale = _left_by_dead_writers(path, "tmp")
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("removed %s, left by an interrupted earlier write of %s", tmp, path)
    for old in _left_by_dead_writers(path, "old"):
        recover_replaced(path, old)
    return stale


def atomic_directory(path: str, write: Callable[[str], None]):
    """Run ``write(tmp_dir)`` then move tmp_dir to ``path`` (which ``check_replaceable`` must
    allow; a symbolic link is followed: the directory it names is replaced, the link stays); on
    failure nothing is left at ``path``, and a failed write (a full disk, a file-size limit: see
    ``files.write_failure``) is one ``CheckpointError`` naming it. Everything written is synced to
    disk before the rename, and the rename itself after it (``files.sync_tree``): a crash or power
    loss leaves the old directory or the complete new one. Temporary directories of earlier writes
    to ``path`` that were killed are removed first (``remove_stale_temporaries``)."""
    path = os.path.realpath(path)
    check_replaceable(path)
    remove_stale_temporaries(path)
    tmp = f"{_temporary_prefix(path)}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with files.write_errors(path, CheckpointError):
        os.makedirs(tmp)
        try:
            write(tmp)
            files.sync_tree(tmp)
        except BaseException:
            remove_abandoned(tmp)
            raise
        if os.path.exists(path):
            old = f"{_temporary_prefix(path, 'old')}{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            remove_path(old)
        else:
            os.replace(tmp, path)
        files.sync_path(os.path.dirname(path))


ABANDONED_WRITES_SETTLE_S = 0.5


def remove_abandoned(tmp: str) -> None:
    """Remove the temporary directory of a failed write, again whenever it reappears within
    ``ABANDONED_WRITES_SETTLE_S``: after one array write fails, Orbax's other writes in flight can
    still create files in it (seen in CI: the directory back after its removal)."""
    deadline = time.monotonic() + ABANDONED_WRITES_SETTLE_S
    while True:
        shutil.rmtree(tmp, ignore_errors=True)
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


def remove_path(path: str) -> None:
    """Remove ``path``, whatever it is (a directory tree, a file, a symbolic link: the link, not
    what it names); nothing when it is gone already."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def save_hf(config: LlamaConfig, params, path: str, tokenizer=None, max_shard_size: int = 5 * 1024**3,
            progress: bool = False, kind: str | None = None, generation: dict | None = None):
    """Write an HF ``LlamaForCausalLM`` directory (``LlamaForSequenceClassification`` for a score
    model: ``kind`` "score", by default when ``params`` hold a score head): safetensors (sharded
    + index when larger than ``max_shard_size`` bytes), config.json (a score model's with
    ``scoring_config``, whose pad token its tokenizer files name), generation_config.json (a
    causal LM's, or any model's given ``generation``: a source's settings that it keeps, with the
    config's token ids: ``generation_config_dict``), tokenizer files when given (a directory or a
    tokenizer)."""
    holds_score = "score" in (nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params)
    kind = kind or ("score" if holds_score else "causal_lm")
    if holds_score != (kind == "score"):
        raise CheckpointError(f"{path}: kind {kind!r} does not match the parameters (a score head: {holds_score})")
    pad_token = None
    if kind == "score":
        config, pad_token = scoring_config(config, tokenizer)
    tensors = hf_tensors(config, params, kind)
    dtypes = {str(t.dtype) for t in tensors.values()}
    stored_dtype = dtypes.pop() if len(dtypes) == 1 else None
    saved_cfg = config.replace(param_dtype=stored_dtype) if stored_dtype in DTYPES else config

    def write(tmp: str):
        shards = _shards(tensors, max_shard_size)
        weight_map = {}
        for i, names in enumerate(tqdm(shards, desc="save shards", disable=not progress)):
            file = SAFE_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(tmp, file), {n: tensors[n] for n in names})
            weight_map.update({n: file for n in names})
        if len(shards) > 1:
            total = sum(t.nbytes for t in tensors.values())
            write_json(os.path.join(tmp, SAFE_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
        write_json(os.path.join(tmp, "config.json"), hf_config_dict(saved_cfg, kind))
        if kind == "causal_lm" or generation is not None:
            write_json(os.path.join(tmp, GENERATION_CONFIG), generation_config_dict(config, generation))
        if tokenizer is not None:
            save_tokenizer_files(tokenizer, tmp, pad_token=pad_token)

    atomic_directory(path, write)


__all__ = [
    "GENERATION_CONFIG",
    "NAME_TABLE",
    "TOKENIZER_FILES",
    "CheckpointError",
    "ModelConfigError",
    "SafetensorsError",
    "abstract_model",
    "atomic_directory",
    "carried_generation_config",
    "check_replaceable",
    "generation_config_dict",
    "hf_tensors",
    "load_hf",
    "load_hf_config",
    "model_from_params",
    "params_from_pure_dict",
    "read_generation_config",
    "save_hf",
    "save_tokenizer_files",
    "set_pad_token",
    "tokenizer_files",
    "write_json",
]
