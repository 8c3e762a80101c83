"""Shared fixtures, deterministic hypothesis settings, and a persistent XLA compilation cache for
the whole run.

The trainers' tests compile the same programs several times (a straight run, a killed run in a
subprocess, its resumption); the cache, shared through the environment with subprocesses and with
pytest-xdist's workers (set before they start), compiles each program once per test session.
"""

import os
import shutil
import tempfile

import pytest
from hypothesis import settings

# Every run draws the same examples (a failure reproduces); no deadline (the first example compiles).
# The property tests set only their number of examples.
settings.register_profile("icegrt", derandomize=True, deadline=None)
settings.load_profile("icegrt")

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # else a user's, or the xdist controller's
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="icegrt-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    """Remove the compilation cache this process made (~30 MB a run)."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


TOKENIZER_CORPUS = [
    ("Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."),
    " ### USER: What is the capital of France? ASSISTANT: The capital of France is Paris.",
    " ### USER: Write a short poem about the sea. ASSISTANT: Waves roll in and out again.",
    "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A saved byte-level BPE tokenizer (<unk>=0, <s>=1, </s>=2, <pad>=3) that encodes any text.

    Load it with ``AutoTokenizer.from_pretrained(path)`` or ``icegrt_jax.data.tokenize.load_tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<pad>")
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    wrapped.save_pretrained(path)
    return str(path)
