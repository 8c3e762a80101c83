"""HF export of what goes around the weights: a reward model's pad token in its tokenizer files,
generation_config.json through convert, the demo's export check."""

import json

import numpy as np
import torch
import transformers
from helpers import make_hf_llama

from icegrt_jax import cli
from icegrt_jax.checkpoint import save_model
from icegrt_jax.hf import load_hf, save_hf


def _tokenizer_without_pad(path) -> str:
    """A saved byte-level BPE tokenizer with only <unk>=0, <s>=1, </s>=2 (no pad token), 280 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["hello world the quick brown fox"] * 4, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(path)
    return str(path)


def test_an_exported_reward_model_scores_a_padded_batch_as_each_row_alone(tmp_path):
    """The training tokenizer has no pad token (the trainer pads with unk): the exported tokenizer
    pads with the id config.json names, so AutoTokenizer(padding=True) + the model give each row's
    own score, padded on either side (without it, padding fails; with eos as pad, transformers
    would score a padding slot)."""
    from icegrt_jax.models.heads import score_params_from_llama

    make_hf_llama(tmp_path / "src", vocab=280)
    cfg, llama_params = load_hf(str(tmp_path / "src"))
    tokenizer_dir = _tokenizer_without_pad(tmp_path / "tok")
    save_model(cfg.replace(pad_token_id=None), score_params_from_llama(llama_params, 5, cfg), str(tmp_path / "rm"),
               tokenizer=tokenizer_dir, kind="score")
    assert cli.main(["convert", str(tmp_path / "rm"), str(tmp_path / "hf")]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert (tokenizer.pad_token, tokenizer.pad_token_id, model.config.pad_token_id) == ("<unk>", 0, 0)
    texts = ["hello world</s>", "the quick brown fox hello", "fox"]
    with torch.no_grad():
        alone = [model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item() for text in texts]
        for side in ("right", "left"):
            tokenizer.padding_side = side
            batch = tokenizer(texts, padding=True, return_tensors="pt")
            assert (batch["attention_mask"] == 0).any()
            np.testing.assert_allclose(model(**batch).logits[:, 0].numpy(), alone, atol=1e-5, err_msg=side)


def test_a_score_model_exported_with_a_tokenizer_object_names_its_pad_token_in_every_map(tmp_path):
    """A tokenizer object is saved, then given the pad token; the caller's object is left as it
    was, and an older special_tokens_map.json (which overrides tokenizer_config.json) says it too."""
    from icegrt_jax.data.tokenize import load_tokenizer
    from icegrt_jax.models.heads import score_params_from_llama

    make_hf_llama(tmp_path / "src", vocab=280)
    cfg, llama_params = load_hf(str(tmp_path / "src"))
    params = score_params_from_llama(llama_params, 5, cfg)
    tokenizer = load_tokenizer(_tokenizer_without_pad(tmp_path / "tok"))
    save_hf(cfg, params, str(tmp_path / "object"), tokenizer=tokenizer)
    assert tokenizer.pad_token is None
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "object").pad_token_id == 0
    (tmp_path / "tok" / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    save_hf(cfg, params, str(tmp_path / "map"), tokenizer=str(tmp_path / "tok"))
    assert json.loads((tmp_path / "map" / "special_tokens_map.json").read_text()) == {"eos_token": "</s>",
                                                                                     "pad_token": "<unk>"}


def test_convert_keeps_the_sampling_defaults_of_generation_config_both_ways(tmp_path):
    """do_sample, temperature, top_p, max_length survive HF -> project -> HF (the project
    checkpoint holds them); the token ids are the config's (every eos id)."""
    make_hf_llama(tmp_path / "hf")
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, 5], pad_token_id=0, do_sample=True,
                                  temperature=0.6, top_p=0.9, max_length=4096).save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert json.loads((tmp_path / "ours" / "generation_config.json").read_text())["temperature"] == 0.6
    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = transformers.GenerationConfig.from_pretrained(tmp_path / "back")
    assert (back.do_sample, back.temperature, back.top_p, back.max_length) == (True, 0.6, 0.9, 4096)
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (1, [2, 5], 0)


def test_the_demo_export_check_stops_transformers_at_every_eos_id(tiny_tokenizer_dir, tmp_path, monkeypatch):
    """transformers generates with every id the exported config ends a response at, as our sampler."""
    from icegrt_jax.demo import pipeline

    make_hf_llama(tmp_path / "src", vocab=400)
    cfg, params = load_hf(str(tmp_path / "src"))
    save_hf(cfg.replace(extra_eos_token_ids=(7,)), params, str(tmp_path / "hf"), tokenizer=tiny_tokenizer_dir)
    seen, generate = [], transformers.LlamaForCausalLM.generate
    monkeypatch.setattr(transformers.LlamaForCausalLM, "generate",
                        lambda self, *a, **kw: seen.append(kw["eos_token_id"]) or generate(self, *a, **kw))
    assert len(pipeline.transformers_greedy(str(tmp_path / "hf"), ["hi"], 2)) == 1
    assert seen == [[2, 7]]
