"""Programmatic scorers for PPO tests, importable as ``ppo_scorers:<name>`` (tests/ is on sys.path)."""


def letter_e_share(prompts, responses):
    """The share of a response's characters that are 'e' (a policy can raise it by choosing tokens)."""
    return [text.count("e") / (len(text) + 1) for text in responses]
