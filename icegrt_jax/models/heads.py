"""ScoreModel: the LLaMA backbone with a scalar head, for the reward model and the PPO critic.

``values = RMSNorm(h_L) @ w_score`` gives one scalar per token [B, T] (the critic's V(s_t));
the reward model's R(s, a) is the value at the last non-padding token of each row (the EOS that
ends the response, or its last token when truncated). Its parameter names match ``Llama``'s
(embed, layers, final_norm) plus ``score``, so a backbone loads from an SFT or HF checkpoint and
its size is independent of the policy's. HF counterpart: ``LlamaForSequenceClassification`` with
``num_labels=1`` (``score.weight`` [1, H]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from icegrt_jax.models.llama import Backbone, LlamaConfig, _param


class ScoreModel(Backbone):
    """``__call__(tokens, mask) -> values [B, T]`` (fp32); ``score`` reads the last real token."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        super().__init__(cfg, rngs)
        self.score = _param(rngs, (cfg.hidden_size,), ("embed",), cfg, fan_in=cfg.hidden_size + 1)

    def __call__(self, tokens, key_mask):
        hidden, _ = self.hidden_states(tokens, key_mask)
        return jnp.einsum("bth,h->bt", hidden, self.score[...].astype(hidden.dtype),
                          preferred_element_type=jnp.float32)


def last_token_index(mask: jax.Array) -> jax.Array:
    """[B] index of the last 1 in each row of ``mask`` (0 for an all-zero row)."""
    positions = jnp.arange(mask.shape[1])
    return jnp.max(jnp.where(mask.astype(bool), positions, 0), axis=1)


def score_at_last_token(values: jax.Array, mask: jax.Array) -> jax.Array:
    """R(s, a) = values[b, last real token of row b]; [B, T] -> [B]."""
    index = last_token_index(mask)
    return jnp.take_along_axis(values, index[:, None], axis=1)[:, 0]


def score_params_from_llama(llama_params, head_rng_seed: int, cfg: LlamaConfig):
    """ScoreModel params from a ``Llama``'s: the backbone shared, a fresh ``score`` head."""
    _, fresh = nnx.split(nnx.eval_shape(lambda: ScoreModel(cfg, nnx.Rngs(head_rng_seed))))
    pure = nnx.to_pure_dict(llama_params)
    score = _param(nnx.Rngs(head_rng_seed), (cfg.hidden_size,), ("embed",), cfg, fan_in=cfg.hidden_size + 1)
    nnx.replace_by_pure_dict(fresh, {"embed": pure["embed"], "layers": pure["layers"],
                                     "final_norm": pure["final_norm"], "score": score.get_value()})
    return fresh
