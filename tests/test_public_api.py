"""The stable public API (the architecture document's list): every name importable from its
module, its documented parameters first, in order, with the documented defaults."""

import importlib
import inspect

import pytest

NO_DEFAULT = inspect.Parameter.empty
STABLE = {  # module -> name -> [(parameter, documented default or NO_DEFAULT)]
    "icegrt_jax.rl": {
        "masked_mean": [("x", NO_DEFAULT), ("mask", NO_DEFAULT), ("axis", None)],
        "masked_var": [("x", NO_DEFAULT), ("mask", NO_DEFAULT), ("unbiased", True)],
        "masked_whiten": [("x", NO_DEFAULT), ("mask", NO_DEFAULT), ("shift_mean", True), ("eps", 1e-8)],
        "kl_penalty": [("logprobs", NO_DEFAULT), ("ref_logprobs", NO_DEFAULT), ("estimator", "k1")],
        "shaped_rewards": [("scores", NO_DEFAULT), ("logprobs", NO_DEFAULT), ("ref_logprobs", NO_DEFAULT),
                           ("mask", NO_DEFAULT), ("kl_coef", NO_DEFAULT), ("estimator", "k1"), ("score_clip", None)],
        "gae": [("rewards", NO_DEFAULT), ("values", NO_DEFAULT), ("mask", NO_DEFAULT), ("gamma", NO_DEFAULT),
                ("lam", NO_DEFAULT)],
        "ppo_policy_loss": [("logprobs", NO_DEFAULT), ("old_logprobs", NO_DEFAULT), ("advantages", NO_DEFAULT),
                            ("mask", NO_DEFAULT), ("clip_eps", 0.2), ("dual_clip", None), ("aggregate", "token_mean")],
        "value_loss": [("values", NO_DEFAULT), ("old_values", NO_DEFAULT), ("returns", NO_DEFAULT),
                       ("mask", NO_DEFAULT), ("clip_range", 0.2)],
    },
    "icegrt_jax.losses": {
        "token_logprobs": [("logits", NO_DEFAULT), ("targets", NO_DEFAULT)],
        "chunked_token_logprobs": [("hidden", NO_DEFAULT), ("lm_head", NO_DEFAULT), ("targets", NO_DEFAULT),
                                   ("chunk_size", NO_DEFAULT)],
        "entropy_from_logits": [("logits", NO_DEFAULT)],
        "sft_loss": [("logits", NO_DEFAULT), ("targets", NO_DEFAULT), ("loss_mask", NO_DEFAULT)],
        "margin_ranking_loss": [("chosen", NO_DEFAULT), ("rejected", NO_DEFAULT), ("margin", 1.0)],
        "bradley_terry_loss": [("chosen", NO_DEFAULT), ("rejected", NO_DEFAULT), ("margin", 0.0)],
    },
    "icegrt_jax.data": {
        "ranking_to_pairs": [("ranked_responses", NO_DEFAULT), ("top_k", 2), ("bottom_k", 2)],
        "aggregate_rankings": [("per_labeler_rankings", NO_DEFAULT)],
    },
    "icegrt_jax.hf": {
        "load_hf": [("path", NO_DEFAULT)],
        "save_hf": [("config", NO_DEFAULT), ("params", NO_DEFAULT), ("path", NO_DEFAULT), ("tokenizer", None)],
    },
    "icegrt_jax.sampling": {
        "generate": [("model_or_params", NO_DEFAULT), ("prompts", NO_DEFAULT), ("params", NO_DEFAULT)],
    },
}


@pytest.mark.parametrize("module, name", [(m, n) for m, names in STABLE.items() for n in names])
def test_documented_signature(module, name):
    parameters = list(inspect.signature(getattr(importlib.import_module(module), name)).parameters.values())
    documented = STABLE[module][name]
    assert [(p.name, p.default) for p in parameters[:len(documented)]] == documented
    assert all(p.default is not NO_DEFAULT or p.kind is p.VAR_KEYWORD
               for p in parameters[len(documented):]), "an undocumented parameter must be optional"


def test_the_kl_controller_has_fixed_and_adaptive_forms():
    from icegrt_jax import rl

    fixed = rl.init_kl_controller(0.05, None, 10000)
    adaptive = rl.init_kl_controller(0.05, 6.0, 10000)
    assert float(rl.update_kl_controller(fixed, 100.0, 512).kl_coef) == pytest.approx(0.05)
    assert float(rl.update_kl_controller(adaptive, 100.0, 512).kl_coef) > 0.05  # KL above target: coefficient up
