"""Evaluation: the lm-evaluation-harness backend and the paper's settings, and the Table 2 rubric.

- ``icegrt_jax.eval.lm_eval_backend``: ``IceGRTLM``, registered in lm-eval as ``icegrt``
  (importing it needs the ``eval`` extra, lm-eval).
- ``icegrt_jax.eval.tasks``: the paper's benchmark settings (configs/eval/) and local data files.
- ``icegrt_jax.eval.rubric``: the 8-criterion human rubric and Fleiss' kappa (no lm-eval needed).

This package imports nothing heavy itself, so the core never needs lm-eval.
"""

from __future__ import annotations

from icegrt_jax.errors import UserInputError

INSTALL_HINT = "pip install icegrt-jax[eval]"


class MissingExtraError(UserInputError):
    """An optional dependency of evaluation is not installed."""


def require_lm_eval():
    """The imported ``lm_eval`` package, or a one-line error saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise MissingExtraError(f"lm-eval (lm-evaluation-harness) is not installed: {INSTALL_HINT}") from None
    return lm_eval


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table: first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
