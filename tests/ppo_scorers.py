"""Programmatic scorers for PPO tests, importable as ``ppo_scorers:<name>`` (tests/ is on sys.path)."""


def letter_e_share(prompts, responses):
    """The share of a response's characters that are 'e' (a policy can raise it by choosing tokens)."""
    return [text.count("e") / (len(text) + 1) for text in responses]


def short_on_process_0(prompts, responses):
    """One score too few when called on process 0 (a scorer that misbehaves on one host)."""
    import jax

    scores = letter_e_share(prompts, responses)
    return scores[:-1] if jax.process_index() == 0 else scores
