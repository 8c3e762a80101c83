"""Prompt templates: the paper's ICE-Instruct format (section 3.1), as text segments.

The paper's template, verbatim::

    Below is an instruction that describes a task. Write a response that appropriately completes
    the request. ### USER: <INPUT> ASSISTANT: <OUTPUT>

A conversation of rounds ``(INPUT_k, OUTPUT_k)`` is rendered as the preamble followed, per round,
by ``" ### USER: " + INPUT_k + " ASSISTANT:"`` (the prompt segment) and ``" " + OUTPUT_k``
(the response segment) and then the tokenizer's EOS token, which is a token, never text::

    Below is ... the request. ### USER: <INPUT_1> ASSISTANT: <OUTPUT_1></s> ### USER: <INPUT_2> ...

Every segment after the preamble starts with its separating space and none ends with one, so
tokenising the segments one by one gives the same ids as tokenising the joined text for
word-boundary tokenizers (byte-level BPE, SentencePiece-style Metaspace); see ``tokenize.py``.
"""

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Round:
    """One dialogue round: the user's input and the assistant's output."""

    user: str
    assistant: str


@dataclass(frozen=True)
class Template:
    """A prompt format: preamble, then ``user_prefix + input + assistant_prefix`` and
    ``response_prefix + output`` per round."""

    name: str
    preamble: str
    user_prefix: str
    assistant_prefix: str
    response_prefix: str

    def prompt(self, user: str) -> str:
        """The prompt segment of a round (no loss on it)."""
        return f"{self.user_prefix}{user}{self.assistant_prefix}"

    def response(self, assistant: str) -> str:
        """The response segment of a round (trained on, followed by EOS). An empty output is no
        text at all, not the separator: a model that ends at once emits EOS straight after the
        prompt, and the reward model scores that response as it was generated."""
        return f"{self.response_prefix}{assistant}" if assistant else ""

    def response_text(self, decoded: str) -> str:
        """A generated response as training data holds it: the decoded tokens without the
        ``response_prefix`` they start with (training tokenises that separator into the first
        response token, so the model emits it), i.e. ``response(response_text(d)) == d``."""
        return decoded.removeprefix(self.response_prefix)


ICEGRT = Template(
    name="icegrt",
    preamble=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    ),
    user_prefix=" ### USER: ",
    assistant_prefix=" ASSISTANT:",
    response_prefix=" ",
)

# Prompts that are already formatted: no preamble, the prompt text as is, one space, the output.
RAW = Template(name="raw", preamble="", user_prefix="", assistant_prefix="", response_prefix=" ")

TEMPLATES: dict[str, Template] = {t.name: t for t in (ICEGRT, RAW)}


def get_template(name: str) -> Template:
    """The template called ``name``."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; choose from {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def render(template: Template, rounds: Sequence[Round], eos: str, next_user: str | None = None) -> str:
    """The full text of a conversation with ``eos`` written after each output.

    With ``next_user`` the text ends with that round's prompt, ready for generation.
    """
    text = template.preamble + "".join(
        template.prompt(r.user) + template.response(r.assistant) + eos for r in rounds
    )
    return text if next_user is None else text + template.prompt(next_user)
