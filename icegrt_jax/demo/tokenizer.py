"""The demo's tokenizer: a byte-level BPE trained on the generated corpus, saved in HF format.

Special tokens ``<unk>=0, <s>=1, </s>=2, <pad>=3`` match the LLaMA presets' ``bos_token_id=1`` and
``eos_token_id=2``. Byte-level pre-tokenisation without a prefix space keeps each word's leading
space on the word, so the prompt template's segments tokenise the same apart as joined, and
digits are split one by one so sums are spelled digit by digit.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def train_tokenizer(texts: Iterable[str], vocab_size: int, directory: str):
    """Train, save to ``directory`` (tokenizer.json + HF configs) and return the HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", clean_up_tokenization_spaces=False)
    fast.save_pretrained(directory)
    return fast
