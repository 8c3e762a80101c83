"""``LlamaConfig``: a LLaMA model's architecture and precision, its HF ``config.json`` form (read
with every value's type checked, written as transformers writes it), and the named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from icegrt_jax import files
from icegrt_jax.errors import UserInputError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots")


class ModelConfigError(UserInputError):
    """A model configuration that we cannot build or do not support."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and precision of a LLaMA model (names follow HF ``config.json``)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    extra_eos_token_ids: tuple[int, ...] = ()  # HF allows a list of eos ids: the ones after the first
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots

    def __post_init__(self):
        ids = tuple(dict.fromkeys((() if self.eos_token_id is None else (self.eos_token_id,))
                                  + tuple(self.extra_eos_token_ids or ())))  # in order, no repeats, hashable
        object.__setattr__(self, "eos_token_id", ids[0] if ids else None)
        object.__setattr__(self, "extra_eos_token_ids", ids[1:])
        if self.hidden_size % self.num_heads:
            raise ModelConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"
            )
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ModelConfigError(f"{field} must be one of {sorted(DTYPES)}, got {getattr(self, field)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ModelConfigError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token that ends a response: ``eos_token_id`` and ``extra_eos_token_ids``."""
        return (() if self.eos_token_id is None else (self.eos_token_id,)) + self.extra_eos_token_ids

    @property
    def hf_eos_token_id(self) -> int | list[int] | None:
        """``eos_token_id`` as HF's config.json holds it: one id, or a list when there are more."""
        return list(self.eos_token_ids) if self.extra_eos_token_ids else self.eos_token_id

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count: embeddings, L x (attention + MLP + 2 norms), final norm, LM head."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else h * self.vocab_size
        return self.vocab_size * h + self.num_layers * layer + h + head

    # --- HF config.json ------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` transformers writes for ``LlamaForCausalLM``."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.hf_eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json", **overrides) -> LlamaConfig:
        """Build from an HF ``config.json`` dict; unsupported features raise ``ModelConfigError``."""
        arch = hf.get("architectures") or [hf.get("model_type", "?")]
        if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
            raise ModelConfigError(
                f"{source}: unsupported architecture {arch[0]!r} (model_type {hf.get('model_type')!r}); "
                "only LLaMA models (LlamaForCausalLM, LlamaForSequenceClassification) are supported"
            )
        for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if hf.get(key, expected) != expected:
                raise ModelConfigError(f"{source}: unsupported {key}={hf[key]!r} (expected {expected!r})")
        _check_hf_value_types(hf, source)
        for key in ("rope_scaling", "rope_parameters"):
            rope = hf.get(key) or {}
            if rope.get("rope_type", rope.get("type", "default")) != "default" or set(rope) - _DEFAULT_ROPE_KEYS:
                raise ModelConfigError(f"{source}: unsupported {key} {rope!r} (only default RoPE)")
        try:
            heads = hf["num_attention_heads"]
            head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
            if head_dim * heads != hf["hidden_size"]:
                raise ModelConfigError(f"{source}: head_dim {head_dim} x heads {heads} != hidden_size")
            rope_params = hf.get("rope_parameters") or {}
            fields = {
                "vocab_size": hf["vocab_size"],
                "hidden_size": hf["hidden_size"],
                "intermediate_size": hf["intermediate_size"],
                "num_layers": hf["num_hidden_layers"],
                "num_heads": heads,
                "num_kv_heads": hf.get("num_key_value_heads") or heads,
                "rope_theta": float(hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
                "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
                "max_position_embeddings": hf.get("max_position_embeddings", 2048),
                "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
                "bos_token_id": _first_id(hf.get("bos_token_id")),
                "eos_token_id": _first_id(hf.get("eos_token_id")),
                "extra_eos_token_ids": _later_ids(hf.get("eos_token_id")),
                "pad_token_id": _first_id(hf.get("pad_token_id")),
            }
        except KeyError as missing:
            raise ModelConfigError(f"{source}: missing key {missing}") from None
        dtype = hf.get("torch_dtype") or hf.get("dtype")
        if dtype in DTYPES:
            fields["param_dtype"] = dtype
        fields.update(overrides)
        try:
            return cls(**fields)
        except ModelConfigError as e:  # sizes that do not fit together: name the file
            raise ModelConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str, **overrides) -> LlamaConfig:
        return cls.from_hf_dict(read_config_json(path), source=path, **overrides)


# config.json keys read by ``from_hf_dict`` and the values they may hold (absent keys take defaults).
_HF_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings")
_HF_OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim")  # null: derived from the others
_HF_POSITIVE_FLOATS = ("rope_theta", "rms_norm_eps")
_HF_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # null, an int or a list of ints
_DEFAULT_ROPE_KEYS = {"rope_type", "type", "rope_theta"}  # anything else (a scaling factor) would be dropped


def _check_hf_value_types(hf: dict[str, Any], source: str) -> None:
    """A one-line ``ModelConfigError`` naming the first config.json value of the wrong type."""
    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    def is_positive_number(value):
        return (is_int(value) or isinstance(value, float)) and 0 < value < float("inf")

    checks = [(key, "a positive integer", lambda v: is_int(v) and v >= 1) for key in _HF_POSITIVE_INTS]
    checks += [(key, "a positive integer or null", lambda v: v is None or (is_int(v) and v >= 1))
               for key in _HF_OPTIONAL_POSITIVE_INTS]
    checks += [(key, "a positive number", is_positive_number) for key in _HF_POSITIVE_FLOATS]
    checks += [(key, "a token id, a non-empty list of them or null",
                lambda v: v is None or is_int(v) or (isinstance(v, list) and v and all(map(is_int, v))))
               for key in _HF_TOKEN_IDS]
    checks += [("tie_word_embeddings", "true, false or null", lambda v: v is None or isinstance(v, bool))]
    checks += [(key, "an object or null", lambda v: v is None or isinstance(v, dict))
               for key in ("rope_scaling", "rope_parameters")]
    for key, expected, ok in checks:
        if key in hf and not ok(hf[key]):
            raise ModelConfigError(f"{source}: {key} must be {expected}, got {hf[key]!r}")
    nested_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 1.0)
    if not is_positive_number(nested_theta):
        raise ModelConfigError(f"{source}: rope_parameters.rope_theta must be a positive number, got {nested_theta!r}")


def read_config_json(path: str) -> dict[str, Any]:
    """An HF config.json as a dict; a missing or unreadable file or bad JSON is a one-line
    ``ModelConfigError``."""
    config = files.read_json(path, ModelConfigError, "an HF config.json")
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path}: expected a JSON object")
    return config


def _first_id(token_id):
    """The first of a config.json token id entry (HF allows a list, e.g. for eos)."""
    return token_id[0] if isinstance(token_id, list) and token_id else token_id


def _later_ids(token_id) -> tuple[int, ...]:
    """The ids of a config.json list entry after the first (``LlamaConfig`` drops repeats)."""
    return tuple(token_id[1:]) if isinstance(token_id, list) else ()


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=512,
    ),
    "bench-small": LlamaConfig(
        vocab_size=8000, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
        num_kv_heads=4, max_position_embeddings=2048,
    ),
    "llama-1b": LlamaConfig(  # TinyLlama-1.1B's shape: the ~1B config of the GPU MFU benchmark
        hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
        max_position_embeddings=2048, rms_norm_eps=1e-5,
    ),
    "llama-7b": LlamaConfig(),
    "llama-13b": LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40
    ),
    "llama2-7b": LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2-13b": LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40,
        max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
    "llama2-70b": LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
        max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
    "vicuna-7b-v1.5": LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0),
    "vicuna-13b-v1.5": LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40,
        max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0,
    ),
}


def preset(name: str, **overrides) -> LlamaConfig:
    """A named architecture (``tiny`` for tests; LLaMA-1/2 and Vicuna v1.5 sizes)."""
    if name not in PRESETS:
        raise ModelConfigError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
