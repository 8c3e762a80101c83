"""``icegrt demo``'s stages, each writing under the output directory (docs/demo.md).

Stages, in order: ``data`` (the generated JSONL files), ``tokenizer``, ``pretrain`` (stage 0:
language modelling from scratch), ``sft`` (ICE-Instruct), ``samples`` (5 responses per prompt),
``annotate`` (3 simulated labelers rank them), ``reward`` (ICE-Reward), ``ppo`` (ICE-GRT),
``evaluate`` (rubric and general task) and ``export`` (HF format + transformers greedy check);
then the report is (re)written. A stage whose output is complete is skipped on rerun; the trainers resume from their
own checkpoints, so an interrupted run continues where it stopped. The first run records its
resolved settings (``settings.json``); a rerun into the same directory with other settings is
refused (``check_settings``).

Configuration (``configs/demo.yaml``): the ``demo`` section (``DemoConfig``), one section per
trainer (``pretrain`` and ``sft``: ``SFTConfig``; ``reward``; ``ppo``) and ``fast``: per section,
the dotted overrides ``--fast`` applies. Paths in the trainer sections start with
``runs/demo/``, which is rewritten to the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import time
from pathlib import Path

from icegrt_jax import files
from icegrt_jax.config import (
    MIN_TEMPERATURE,
    ConfigError,
    PPOConfig,
    RewardConfig,
    SFTConfig,
)
from icegrt_jax.config_loader import load_config, read_yaml_mapping
from icegrt_jax.data.sources import DataError, jsonl_records
from icegrt_jax.demo import annotator, data
from icegrt_jax.demo.tokenizer import train_tokenizer
from icegrt_jax.errors import UserInputError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"  # package data
CONFIG_ROOT = "runs/demo"
PRETRAIN_PROMPT = "Write a document."
SECTIONS = {"pretrain": SFTConfig, "sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig}
ICE_INSTRUCT, ICE_GRT = "ICE-Instruct", "ICE-GRT"


@dataclasses.dataclass
class DemoConfig:
    """Sizes of the generated data, sampling and evaluation settings of the demo."""

    seed: int = 0
    vocab_size: int = 1024
    held_out_ad_fraction: float = 0.2
    held_out_arithmetic: int = 60
    pretrain_documents: int = 4000
    sft_ad_examples: int = 2400
    sft_arithmetic_examples: int = 1200
    sft_eval_examples: int = 128
    ranking_prompts: int = 400
    ranking_eval_fraction: float = 0.1
    ppo_prompts: int = 1000
    eval_ad_prompts: int = 90
    samples_per_prompt: int = 5
    temperature: float = 1.0
    max_new_tokens: int = 64
    generate_batch_size: int = 64
    export_check_prompts: int = 8

    def problems(self):
        """Checked when the config loads, before any stage runs (``config_loader.load_config``)."""
        counts = [f.name for f in dataclasses.fields(self) if f.type in ("int", int) and f.name != "seed"]
        yield from ((name, f"must be >= 1, got {getattr(self, name)}") for name in counts if getattr(self, name) < 1)
        yield from ((name, f"must be in (0, 1), got {getattr(self, name)}")
                    for name in ("held_out_ad_fraction", "ranking_eval_fraction") if not 0 < getattr(self, name) < 1)
        if not (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE):
            yield "temperature", f"must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}"
        if not 0 <= self.seed <= 2**32 - 2:  # the sampler's seeds are uint32; evaluation uses seed + 1
            yield "seed", f"must be in [0, 2**32 - 2], got {self.seed}"
        sums = len(data.all_arithmetic_cases())  # pretraining documents draw 3 training sums each
        if self.held_out_arithmetic > sums - 3:
            yield "held_out_arithmetic", f"must leave at least 3 of the {sums} arithmetic problems, got {self.held_out_arithmetic}"
        if 0 < self.held_out_ad_fraction < 1 and self.eval_ad_prompts > (available := held_out_ad_prompts(self)):
            yield "eval_ad_prompts", (f"must be at most {available} (held-out ads x question forms at "
                                      f"held_out_ad_fraction {self.held_out_ad_fraction}), got {self.eval_ad_prompts}")


def held_out_ad_prompts(cfg: DemoConfig) -> int:
    """How many distinct evaluation prompts the held-out ads give (each ad in every question form)."""
    return len(data.split_ad_cases(cfg.seed, cfg.held_out_ad_fraction)[1]) * len(data.QUESTION_FORMS)


# What a demo writes at the top of its --out directory (``check_out``).
SETTINGS_FILE = "settings.json"  # the resolved settings of the run that wrote the directory (check_settings)
OUTPUTS = frozenset({"data", "pretrain", "sft", "rlhf", "reward", "ppo", "eval", "export", "xla-cache",
                     SETTINGS_FILE, "timings.json", "report.md", "report.json", "ppo_curves.png", "reward_curve.png"})


def check_out(out: str) -> None:
    """``--out`` must be new, empty or an earlier demo's (which a rerun resumes): a directory that
    holds anything else is refused, as the trainers refuse a directory that is not a run's."""
    if not os.path.isdir(out):
        return
    foreign = sorted(name for name in os.listdir(out) if name.split(".tmp-")[0] not in OUTPUTS)
    if foreign:
        raise UserInputError(f"--out {out}: not empty and not a demo's output (it holds {foreign[0]!r}); "
                             "choose a new or empty directory")


@dataclasses.dataclass
class Run:
    """Where the demo writes and the resolved configuration of every stage."""

    out: str
    demo: DemoConfig
    trainers: dict  # section -> config

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)


# --- configuration -----------------------------------------------------------------------------

def relocate(value, root: str, source: str = CONFIG_ROOT):
    """``value`` (a config dataclass, dict, list or string) with paths under ``source`` (by default
    ``runs/demo``) moved to ``root``."""
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: relocate(getattr(value, f.name), root, source)
                                             for f in dataclasses.fields(value)})
    if isinstance(value, dict):
        return {key: relocate(v, root, source) for key, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, root, source) for v in value]
    prefix = os.path.join(source, "")
    if isinstance(value, str) and (value == source or value.startswith(prefix)):
        return os.path.join(root, value[len(prefix):])
    return value


def load_run(out: str, config_path: str | None = None, fast: bool = False, seed: int | None = None) -> Run:
    """The demo's configuration from ``config_path`` (default ``configs/demo.yaml``), with the
    ``fast`` overrides when asked and ``seed`` (if given) for the data, labelers and trainers."""
    path = str(config_path or DEFAULT_CONFIG)
    fast_overrides = read_yaml_mapping(path).get("fast", {}) if fast else {}
    if not (isinstance(fast_overrides, dict) and all(
            isinstance(items, list) and all(isinstance(item, str) for item in items) for items in fast_overrides.values())):
        raise ConfigError(f"{path}: 'fast' must map each section to a list of key=value overrides")

    def overrides(section: str, seed_key: str) -> list[str]:
        return list(fast_overrides.get(section, [])) + ([f"{seed_key}={seed}"] if seed is not None else [])

    demo = load_config(DemoConfig, path, overrides("demo", "seed"), section="demo")
    trainers = {name: relocate(load_config(schema, path, overrides(name, "training.seed"), section=name), out)
                for name, schema in SECTIONS.items()}
    return Run(out, demo, trainers)


def run_settings(run: Run) -> dict:
    """Every stage's resolved settings as JSON, with paths under ``run.out`` written as under
    ``runs/demo`` (the same run named by another path has the same settings)."""
    sections = {"demo": run.demo, **run.trainers}
    return json.loads(json.dumps({name: dataclasses.asdict(relocate(cfg, CONFIG_ROOT, run.out))
                                  for name, cfg in sections.items()}, default=str))


def setting_differences(recorded, current, key: str = "") -> list[str]:
    """``dotted.key: recorded -> current`` for each setting both have that differs (JSON values); a
    setting on one side only (a field a later version added or removed) is not a difference."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [line for name in sorted(recorded.keys() & current.keys())
                for line in setting_differences(recorded[name], current[name], f"{key}.{name}" if key else name)]
    return [] if recorded == current else [f"{key or 'settings'}: {json.dumps(recorded)} -> {json.dumps(current)}"]


def check_settings(run: Run) -> None:
    """Record ``run_settings`` in ``OUT/settings.json`` on the first run into ``OUT``; a rerun with
    other settings (``--seed``, ``--fast``, ``--config``), which would reuse the stages finished
    with the recorded ones, is refused with a ``UserInputError`` naming the differences."""
    path, current = run.path(SETTINGS_FILE), run_settings(run)
    if not os.path.exists(path):
        write_json(path, current)
        return
    if differences := setting_differences(read_json(path), current):
        more = f"; and {len(differences) - 3} more" if len(differences) > 3 else ""
        raise UserInputError(f"--out {run.out}: holds a demo run with other settings ({'; '.join(differences[:3])}{more}), "
                             "whose finished stages would be reused; rerun with its settings or choose a new --out")


# --- files -------------------------------------------------------------------------------------

def write_jsonl(path: str, records) -> None:
    """Write atomically (temporary file renamed into place)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_jsonl(path, records)


def read_jsonl(path: str) -> list[dict]:
    """The records of a stage's JSONL output; a corrupted file is a one-line error naming its line."""
    return [record for _, record in jsonl_records(path)]


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_json(path, obj)


def read_json(path: str):
    return files.read_json(path, DataError)


# --- stage: data and tokenizer -----------------------------------------------------------------

def generate_data(cfg: DemoConfig) -> dict[str, list[dict]]:
    """Every generated file's records (module ``data``); ad and arithmetic evaluation prompts are
    held out of all training data."""
    rng = random.Random(cfg.seed)
    quality = data.DemoQuality()
    ads, held_out_ads = data.split_ad_cases(cfg.seed, cfg.held_out_ad_fraction)
    sums, held_out_sums = data.split_arithmetic_cases(cfg.seed, cfg.held_out_arithmetic)
    pretrain = data.pretraining_documents(rng, ads, sums, cfg.pretrain_documents, quality)
    sft = ([{"prompt": p, "response": data.demonstration(rng, case, quality)}
            for p, case in data.sample_ad_prompts(rng, ads, cfg.sft_ad_examples)]
           + [{"prompt": c.question, "response": c.response} for c in rng.choices(sums, k=cfg.sft_arithmetic_examples)])
    rng.shuffle(sft)
    eval_ad = [{"prompt": data.ad_prompt(case, form), "prompt_id": f"ad{i}"}
               for i, (case, form) in enumerate((c, f) for c in held_out_ads for f in range(len(data.QUESTION_FORMS)))]
    return {
        "pretrain": [{"prompt": PRETRAIN_PROMPT, "response": doc} for doc in pretrain],
        "sft_train": sft[cfg.sft_eval_examples:],
        "sft_eval": sft[:cfg.sft_eval_examples],
        "ranking_prompts": [{"prompt": p} for p, _ in data.sample_ad_prompts(rng, ads, cfg.ranking_prompts)],
        "ppo_prompts": [{"prompt": p} for p, _ in data.sample_ad_prompts(rng, ads, cfg.ppo_prompts)],
        "eval_ad": rng.sample(eval_ad, cfg.eval_ad_prompts),  # at most len(eval_ad): DemoConfig.problems
        "eval_general": [{"prompt": c.question, "answer": c.answer} for c in held_out_sums],
    }


def stage_data(run: Run) -> None:
    for name, records in generate_data(run.demo).items():
        write_jsonl(run.path("data", f"{name}.jsonl"), records)


def stage_tokenizer(run: Run) -> None:
    from icegrt_jax.data.templates import ICEGRT

    texts = [r[k] for name in ("pretrain", "sft_train") for r in read_jsonl(run.path("data", f"{name}.jsonl"))
             for k in ("prompt", "response")]
    texts += [ICEGRT.preamble, ICEGRT.prompt(""), ICEGRT.response("")]
    from icegrt_jax.hf import atomic_directory

    atomic_directory(run.path("data", "tokenizer"), lambda tmp: train_tokenizer(texts, run.demo.vocab_size, tmp))


# --- generation --------------------------------------------------------------------------------

def generate_responses(model_dir: str, prompts: list[str], cfg: DemoConfig, *, greedy: bool = False,
                       num_samples: int = 1, seed: int = 0) -> tuple[list[list[str]], list[list[bool]]]:
    """``num_samples`` decoded responses per prompt from a saved policy (template-rendered), and
    per response whether it hit ``demo.max_new_tokens`` before an end token (both per prompt)."""
    from icegrt_jax.checkpoint import load_model_dir
    from icegrt_jax.data.templates import ICEGRT
    from icegrt_jax.data.tokenize import load_tokenizer, pad_token_id, tokenize_prompt
    from icegrt_jax.hf import abstract_model
    from icegrt_jax.sampling import SamplingParams, generate

    tokenizer = load_tokenizer(model_dir)
    model_cfg, params = load_model_dir(model_dir)
    sampling = SamplingParams(temperature=cfg.temperature, greedy=greedy, max_new_tokens=cfg.max_new_tokens,
                              eos_token_ids=(tokenizer.eos_token_id,), num_samples=num_samples, seed=seed,
                              pad_id=pad_token_id(tokenizer))
    result = generate((abstract_model(model_cfg)[0], params), [tokenize_prompt(tokenizer, ICEGRT, p) for p in prompts],
                      sampling, batch_size=cfg.generate_batch_size, progress=True)
    texts = [tokenizer.decode(result.response_tokens(r), skip_special_tokens=True).strip()
             for r in range(len(result.tokens))]
    if cut := int((~result.finished_by_eos).sum()):
        print(f"{cut} of {len(texts)} responses hit demo.max_new_tokens ({cfg.max_new_tokens}) before an end token")
    truncated = (~result.finished_by_eos).tolist()
    per_prompt = [slice(i * num_samples, (i + 1) * num_samples) for i in range(len(prompts))]
    return [texts[rows] for rows in per_prompt], [truncated[rows] for rows in per_prompt]


def one_response_each(model_dir: str, prompts: list[str], cfg: DemoConfig, **options) -> list[str]:
    """One response per prompt (``generate_responses`` with one sample)."""
    return [responses[0] for responses in generate_responses(model_dir, prompts, cfg, **options)[0]]


# --- stage: samples and annotation -------------------------------------------------------------

def stage_samples(run: Run) -> None:
    prompts = [r["prompt"] for r in read_jsonl(run.path("data", "ranking_prompts.jsonl"))]
    responses, truncated = generate_responses(run.path("sft", "final"), prompts, run.demo,
                                              num_samples=run.demo.samples_per_prompt, seed=run.demo.seed)
    write_jsonl(run.path("rlhf", "samples.jsonl"), [{"prompt": p, "responses": r, "truncated": t}
                                                     for p, r, t in zip(prompts, responses, truncated, strict=True)])


def rank_responses(prompt: str, responses: list[str], seed: int, item: int) -> list[list[int]]:
    """Each simulated labeler's best-first ranking of one prompt's responses."""
    labels = [annotator.annotate(prompt, r) for r in responses]
    return [labeler.rank(annotator.labeler_rng(seed, item, k), labels) for k, labeler in enumerate(annotator.LABELERS)]


def stage_annotate(run: Run) -> None:
    from icegrt_jax.data import aggregate_rankings

    samples = read_jsonl(run.path("rlhf", "samples.jsonl"))
    records = [{**s, "rankings": rank_responses(s["prompt"], s["responses"], run.demo.seed, i)}
               for i, s in enumerate(samples)]
    consensus = [aggregate_rankings(r["rankings"]) for r in records]
    cut = max(1, round(run.demo.ranking_eval_fraction * len(records)))
    write_jsonl(run.path("rlhf", "rankings_eval.jsonl"), records[:cut])
    write_jsonl(run.path("rlhf", "rankings_train.jsonl"), records[cut:])
    write_json(run.path("rlhf", "agreement.json"), {
        "rankings": len(records), "labelers": [l.name for l in annotator.LABELERS],
        "mean_kendall_tau": sum(c.mean_kendall_tau for c in consensus) / len(consensus),
        "mean_kendall_w": sum(c.kendall_w for c in consensus) / len(consensus),
        "distinct_responses_per_prompt": sum(len(set(r["responses"])) for r in records) / len(records),
    })


# --- stage: trainers ---------------------------------------------------------------------------

def stage_trainer(name: str):
    def train(run: Run) -> None:
        from icegrt_jax.train.ppo import run_ppo
        from icegrt_jax.train.reward import run_reward
        from icegrt_jax.train.sft import run_sft

        trainer = {"pretrain": run_sft, "sft": run_sft, "reward": run_reward, "ppo": run_ppo}[name]
        trainer(run.trainers[name])

    return train


# --- stage: evaluation -------------------------------------------------------------------------

ANSWER = re.compile(r"The answer is (-?\d+)\.")


def general_accuracy(responses: list[str], answers: list[int]) -> float:
    """Percent of responses whose "The answer is N." states the right N."""
    correct = sum(bool(m := ANSWER.search(r)) and int(m.group(1)) == a for r, a in zip(responses, answers))
    return 100.0 * correct / len(answers)


def rubric_annotations(model: str, prompts: list[dict], responses: list[str], seed: int) -> list[dict]:
    """The three labelers' rubric annotations (``eval.rubric`` schema) of one model's responses."""
    records = []
    for item, (prompt, response) in enumerate(zip(prompts, responses)):
        labels = annotator.annotate(prompt["prompt"], response)
        for k, labeler in enumerate(annotator.LABELERS):
            rng = annotator.labeler_rng(seed, item, k + len(annotator.LABELERS))
            records.append({"model": model, "prompt_id": prompt["prompt_id"], "labeler": labeler.name,
                            "labels": labeler.labels(rng, labels)})
    return records


def rubric_scores(annotations: list[dict]) -> dict:
    from icegrt_jax.eval.rubric import parse_annotation, rubric_report

    return rubric_report([parse_annotation(a, "demo") for a in annotations])


def stage_evaluate(run: Run) -> None:
    cfg = run.demo
    ads, general = read_jsonl(run.path("data", "eval_ad.jsonl")), read_jsonl(run.path("data", "eval_general.jsonl"))
    models = {ICE_INSTRUCT: run.path("sft", "final"), ICE_GRT: run.path("ppo", "final")}
    results, rows, annotations = {"decoding": {}, "general_accuracy": {}}, [], {"sampled": [], "greedy": []}
    for model, directory in models.items():
        for decoding in ("sampled", "greedy"):
            texts = one_response_each(directory, [a["prompt"] for a in ads], cfg, greedy=decoding == "greedy",
                                      seed=cfg.seed + 1)
            annotations[decoding] += rubric_annotations(model, ads, texts, cfg.seed)
            rows += [{"model": model, "decoding": decoding, "prompt": a["prompt"], "response": t}
                     for a, t in zip(ads, texts)]
        answers = one_response_each(directory, [g["prompt"] for g in general], cfg, greedy=True)
        results["general_accuracy"][model] = general_accuracy(answers, [g["answer"] for g in general])
        rows += [{"model": model, "decoding": "greedy", "prompt": g["prompt"], "response": t}
                 for g, t in zip(general, answers)]
    for decoding, records in annotations.items():
        write_jsonl(run.path("eval", f"annotations_{decoding}.jsonl"), records)
        results["decoding"][decoding] = rubric_scores(records)
    results["general_prompts"], results["ad_prompts"] = len(general), len(ads)
    write_jsonl(run.path("eval", "responses.jsonl"), rows)
    write_json(run.path("eval", "results.json"), results)


# --- stage: export -----------------------------------------------------------------------------

def transformers_greedy(hf_dir: str, prompts: list[str], max_new_tokens: int) -> list[str] | None:
    """Greedy responses of the exported model run by transformers (None without torch)."""
    try:
        import torch
    except ImportError:
        return None
    from transformers import AutoTokenizer, LlamaForCausalLM

    from icegrt_jax.data.templates import ICEGRT
    from icegrt_jax.data.tokenize import tokenize_prompt
    from icegrt_jax.hf import load_hf_config

    local = {"local_files_only": True, "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, **local)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True, **local).eval()
    eos_ids = list(load_hf_config(hf_dir).eos_token_ids)  # every id our sampler stops at
    texts = []
    for prompt in prompts:
        ids = torch.tensor([tokenize_prompt(tokenizer, ICEGRT, prompt).tolist()])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                                 pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return texts


def stage_export(run: Run) -> None:
    from icegrt_jax.checkpoint import load_model_dir
    from icegrt_jax.hf import save_hf

    final = run.path("ppo", "final")
    hf_dir = run.path("export", "hf")
    save_hf(*load_model_dir(final), hf_dir, tokenizer=final)
    prompts = [r["prompt"] for r in read_jsonl(run.path("data", "eval_ad.jsonl"))[:run.demo.export_check_prompts]]
    ours = one_response_each(hf_dir, prompts, run.demo, greedy=True)
    theirs = transformers_greedy(hf_dir, prompts, run.demo.max_new_tokens)
    write_json(run.path("export", "check.json"), {
        "hf_dir": hf_dir, "prompts": len(prompts),
        "transformers_available": theirs is not None,
        "identical_greedy": None if theirs is None else sum(a == b for a, b in zip(ours, theirs)),
        "examples": [{"prompt": p, "ours": a, "transformers": b} for p, a, b in zip(prompts, ours, theirs or [None] * len(ours))],
    })


# --- the run -----------------------------------------------------------------------------------

STAGES = (
    ("data", stage_data, lambda run: os.path.exists(run.path("data", "eval_general.jsonl"))),
    ("tokenizer", stage_tokenizer, lambda run: os.path.isdir(run.path("data", "tokenizer"))),
    ("pretrain", stage_trainer("pretrain"), lambda run: os.path.isdir(run.path("pretrain", "final"))),
    ("sft", stage_trainer("sft"), lambda run: os.path.isdir(run.path("sft", "final"))),
    ("samples", stage_samples, lambda run: os.path.exists(run.path("rlhf", "samples.jsonl"))),
    ("annotate", stage_annotate, lambda run: os.path.exists(run.path("rlhf", "agreement.json"))),
    ("reward", stage_trainer("reward"), lambda run: os.path.isdir(run.path("reward", "final"))),
    ("ppo", stage_trainer("ppo"), lambda run: all(os.path.isdir(run.path("ppo", name)) for name in ("final", "final-critic"))),
    ("evaluate", stage_evaluate, lambda run: os.path.exists(run.path("eval", "results.json"))),
    ("export", stage_export, lambda run: os.path.exists(run.path("export", "check.json"))),
)


def run_demo(run: Run) -> dict[str, float]:
    """Run every stage not yet complete (``check_settings`` first), then write the report; returns and records
    (``timings.json``) each stage's wall seconds."""
    from icegrt_jax.demo.report import write_report

    check_settings(run)
    timings_path = run.path("timings.json")
    timings = read_json(timings_path) if os.path.exists(timings_path) else {}
    for number, (name, stage, done) in enumerate(STAGES, 1):
        if done(run):
            print(f"[demo] {number}/{len(STAGES)} {name}: done, skipped")
            continue
        print(f"[demo] {number}/{len(STAGES)} {name} ...", flush=True)
        began = time.perf_counter()
        stage(run)
        if not done(run):
            raise RuntimeError(f"stage {name} returned without its output")  # a stopped trainer raises instead
        timings[name] = round(time.perf_counter() - began, 1)
        write_json(timings_path, timings)
        print(f"[demo] {number}/{len(STAGES)} {name}: {timings[name]:.1f} s", flush=True)
    write_report(run, timings)
    print(f"[demo] report: {run.path('report.md')}")
    return timings
