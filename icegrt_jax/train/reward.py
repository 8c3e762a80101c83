"""ICE-Reward: a ScoreModel trained on (better, worse) response pairs (paper section 3.2).

Loss per pair (chosen a_i ranked above rejected a_j for prompt s), R read at the response's EOS:
``margin_ranking``: max(0, margin - R(s, a_i) + R(s, a_j)) (the paper's), or ``bradley_terry``:
-log sigmoid(R(s, a_i) - R(s, a_j) - margin). Pairs are averaged over the (accumulated) batch.
The final checkpoint (``final/``) carries ``reward_stats.json``: the mean and standard deviation
of R over the evaluation pairs (else the training pairs), for reward normalisation in PPO.
Same loop, checkpoints, exact resume and sharding over ``cfg.mesh`` as SFT (``train/sft.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from icegrt_jax import files
from icegrt_jax.checkpoint import load_model_dir, save_model
from icegrt_jax.config import ConfigError, RewardConfig
from icegrt_jax.data.batching import (
    BatchIterator,
    bucket_lengths,
    eval_batches,
    padded_length,
)
from icegrt_jax.data.preferences import load_preferences
from icegrt_jax.data.sources import Conversation, DataError
from icegrt_jax.data.templates import Round, get_template
from icegrt_jax.data.tokenize import (
    TokenizedExample,
    pad_token_id,
    tokenize_conversations,
)
from icegrt_jax.hf import abstract_model, read_config_kind
from icegrt_jax.losses import bradley_terry_loss, margin_ranking_loss
from icegrt_jax.models.heads import score_at_last_token, score_params_from_llama
from icegrt_jax.sharding import Partitioner, all_or_none, initialize_distributed
from icegrt_jax.train.loop import (
    check_output_dir,
    data_position_meta,
    open_run,
    shows_progress,
    train_loop,
)
from icegrt_jax.train.model_init import init_model, model_config, run_tokenizer
from icegrt_jax.train.state import (
    accumulate_gradients,
    apply_gradients,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    split_micro_batches,
)

REWARD_STATS_FILE = "reward_stats.json"
REWARD_STATS_KEYS = ("score_mean", "score_std")  # what PPO's reward.normalize=stats reads


def read_reward_stats(path: str) -> dict:
    """A reward model's ``reward_stats.json``; bad JSON or a missing or non-numeric
    ``score_mean`` / ``score_std`` is a one-line ``DataError`` naming the file."""
    stats = files.read_json(path, DataError)
    if not isinstance(stats, dict):
        raise DataError(f"{path}: expected one JSON object with {' and '.join(REWARD_STATS_KEYS)}")
    for key in REWARD_STATS_KEYS:
        if isinstance(stats.get(key), bool) or not isinstance(stats.get(key), (int, float)):
            raise DataError(f"{path}: field {key!r} must be a number, got {stats.get(key)!r}")
    if not 0 < stats["score_std"] < float("inf") or not math.isfinite(stats["score_mean"]):
        raise DataError(f"{path}: score_std must be a positive number and score_mean finite "
                        f"(got {stats['score_std']!r}, {stats['score_mean']!r}): reward.normalize=stats divides by it")
    return stats


@dataclasses.dataclass(frozen=True)
class PairExample:
    chosen: TokenizedExample
    rejected: TokenizedExample

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def tokenize_pairs(pairs, tokenizer, template, max_length: int, progress: bool = False) -> tuple[list[PairExample], int]:
    """Prompt + response + EOS for both sides of each pair (no EOS after a response cut at its
    maximum length); a pair with a side longer than ``max_length`` is dropped. Returns
    (examples, number dropped)."""

    def side(name):
        conversations = [Conversation((Round(p.prompt, getattr(p, name)),), f"{p.source}#{k}")
                         for k, p in enumerate(pairs)]
        examples, _ = tokenize_conversations(conversations, tokenizer, template, max_length=max_length,
                                             truncation="drop_example", progress=progress)
        cut = {f"{p.source}#{k}" for k, p in enumerate(pairs) if not getattr(p, f"{name}_ended")}
        return {e.source: without_eos(e) if e.source in cut else e for e in examples}

    chosen, rejected = side("chosen"), side("rejected")
    kept = [PairExample(chosen[key], rejected[key]) for key in chosen if key in rejected]
    return kept, len(pairs) - len(kept)


def without_eos(example: TokenizedExample) -> TokenizedExample:
    """``example`` without the EOS that ends it."""
    return dataclasses.replace(example, input_ids=example.input_ids[:-1], response_mask=example.response_mask[:-1])


def collate_pairs(pairs, buckets, pad_id, num_counted=None) -> dict[str, np.ndarray]:
    """``input_ids`` / ``attention_mask`` [B, 2, T] (chosen, rejected; right padding) and
    ``weight`` [B]: 1 for a counted pair, 0 for a filler pair completing the last batch."""
    length = padded_length(max(len(p) for p in pairs), buckets)
    input_ids = np.full((len(pairs), 2, length), pad_id, np.int32)
    attention_mask = np.zeros((len(pairs), 2, length), np.int32)
    for i, pair in enumerate(pairs):
        for j, side in enumerate((pair.chosen, pair.rejected)):
            input_ids[i, j, :len(side)] = side.input_ids
            attention_mask[i, j, :len(side)] = 1
    weight = np.zeros(len(pairs), np.float32)
    weight[:len(pairs) if num_counted is None else num_counted] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "weight": weight}


def pair_scores(graphdef, params, batch):
    """(R chosen [B], R rejected [B]) at each response's last real token."""
    length = batch["input_ids"].shape[-1]
    tokens, mask = batch["input_ids"].reshape(-1, length), batch["attention_mask"].reshape(-1, length)
    scores = score_at_last_token(nnx.merge(graphdef, params)(tokens, mask), mask).reshape(-1, 2)
    return scores[:, 0], scores[:, 1]


def per_pair_loss(loss_type: str, margin: float, chosen, rejected):
    """The configured pairwise loss of each pair, [B] (the formulas live in ``losses``)."""
    loss_fn = margin_ranking_loss if loss_type == "margin_ranking" else bradley_terry_loss
    return jax.vmap(lambda c, r: loss_fn(c[None], r[None], margin=margin))(chosen, rejected)


def pair_metric_sums(chosen, rejected, weight):
    """Weighted sums whose ratio to sum(weight) gives accuracy, mean margin, score moments."""
    return {"accuracy": jnp.sum(weight * (chosen > rejected)),
            "margin": jnp.sum(weight * (chosen - rejected)),
            "score_mean": jnp.sum(weight * (chosen + rejected)) / 2,
            "score_sq_mean": jnp.sum(weight * (chosen ** 2 + rejected ** 2)) / 2}


def make_train_step(graphdef, tx, schedule, accum_steps: int, loss_type: str, margin: float, *,
                    partitioner: Partitioner | None = None, state_shardings=None):
    """Jitted ``(state, batch) -> (state, metrics)``; the old state's buffers are donated.
    With a ``partitioner`` the step runs sharded (state laid out by ``state_shardings``)."""

    def sum_loss(params, micro_batch):
        loss_sum, weight, metric_sums = weighted_pair_sums(graphdef, loss_type, margin, params, micro_batch)
        return loss_sum, (weight, metric_sums)

    def step(state, batch):
        micro = split_micro_batches(batch, accum_steps)
        grads, loss, pairs, metrics = accumulate_gradients(sum_loss, state.params, micro)
        lr = schedule(state.step)
        state, update_metrics = apply_gradients(state, grads, loss, tx)
        return state, {"loss": loss, "pairs": pairs, "lr": lr, **_score_std(metrics), **update_metrics}

    if partitioner is None:
        return jax.jit(step, donate_argnums=0)
    return partitioner.jit_train_step(step, state_shardings)


def _score_std(metrics):
    """Replace the mean of R^2 by std(R) = sqrt(E[R^2] - E[R]^2)."""
    metrics = dict(metrics)
    variance = metrics.pop("score_sq_mean") - metrics["score_mean"] ** 2
    return {**metrics, "score_std": jnp.sqrt(jnp.maximum(variance, 0.0))}


def weighted_pair_sums(graphdef, loss_type: str, margin: float, params, batch):
    """(sum of the pairs' losses, number of counted pairs, ``pair_metric_sums``) of a batch, each
    pair weighted by ``batch["weight"]`` (0 for filler pairs)."""
    chosen, rejected = pair_scores(graphdef, params, batch)
    weight = batch["weight"]
    losses = per_pair_loss(loss_type, margin, chosen, rejected)
    return jnp.sum(weight * losses), jnp.sum(weight), pair_metric_sums(chosen, rejected, weight)


def eval_sums(graphdef, loss_type: str, margin: float, params, batch):
    """(metric sums, the loss's included; number of counted pairs) of one evaluation batch."""
    loss_sum, weight, metric_sums = weighted_pair_sums(graphdef, loss_type, margin, params, batch)
    return {"loss": loss_sum, **metric_sums}, weight


def make_eval_fn(graphdef, loss_type: str, margin: float, examples, batch_size, buckets, pad_id,
                 partitioner: Partitioner | None = None, param_shardings=None, progress: bool = False):
    """Held-out pairwise loss, accuracy, mean margin and score mean/std of a state's params
    (sharded with a ``partitioner``)."""
    sums_fn = functools.partial(eval_sums, graphdef, loss_type, margin)
    if partitioner is None:
        sums, to_device = jax.jit(sums_fn), lambda batch: {k: jnp.asarray(v) for k, v in batch.items()}
    else:
        sums = partitioner.jit(sums_fn, in_shardings=(param_shardings, partitioner.batch_sharding),
                               out_shardings=partitioner.replicated)
        to_device = partitioner.shard_batch

    def evaluate(state) -> dict[str, float]:
        totals, count = None, 0.0
        for batch in eval_batches(examples, batch_size=batch_size, buckets=buckets, pad_id=pad_id,
                                  collate_fn=collate_pairs, progress=progress):
            metric_sums, n = sums(state.params, to_device(batch))
            totals = metric_sums if totals is None else jax.tree.map(jnp.add, totals, metric_sums)
            count += float(n)
        means = {k: float(v) / count for k, v in totals.items()}
        return {k: float(v) for k, v in _score_std(means).items()}

    return evaluate


def init_score_params(cfg: RewardConfig, min_vocab: int, partitioner: Partitioner):
    """A ScoreModel on ``partitioner``'s mesh: resumed from a saved score model (project or HF
    LlamaForSequenceClassification checkpoint), or a Llama backbone (SFT / HF checkpoint, or a
    preset initialised at random) with a fresh score head."""
    path = cfg.model.hf_path
    if path is not None and read_config_kind(path) == "score":
        loaded, params = load_model_dir(path, progress=shows_progress(cfg.logging), kind="score",
                                        partitioner=partitioner, param_dtype=cfg.model.param_dtype)
        llama = model_config(cfg.model, loaded)
    else:
        llama, llama_params = init_model(cfg.model, cfg.training.seed, partitioner, min_vocab=min_vocab,
                                         progress=shows_progress(cfg.logging))
        params = score_params_from_llama(llama_params, cfg.training.seed + 1, llama)
    if llama.vocab_size < min_vocab:
        raise ConfigError(f"model.vocab_size: {llama.vocab_size} is smaller than the tokenizer's {min_vocab} tokens")
    return llama, params


def run_reward(cfg: RewardConfig) -> dict:
    """Train (or resume) a reward model; writes config.yaml, metrics.jsonl, checkpoints/ and
    final/ (a score-model checkpoint with the tokenizer and reward_stats.json). Runs sharded over
    ``cfg.mesh``; a multi-process launch joins ``jax.distributed`` first."""
    initialize_distributed()
    check_output_dir(cfg.training.output_dir)  # before any model loads
    partitioner = Partitioner.from_config(cfg.mesh)
    partitioner.check_batch_size(cfg.data.batch_size, cfg.optimizer.grad_accum_steps)
    with all_or_none("loading the data"):  # a file one process cannot read stops every process
        tokenizer = run_tokenizer(cfg)
        template = get_template(cfg.data.template)
        if not cfg.data.train_files:
            raise DataError("data.train_files: no preference files given")
        train_pairs, train_report = load_preferences(cfg.data.train_files, cfg.loss.top_k, cfg.loss.bottom_k)
        train, train_dropped = tokenize_pairs(train_pairs, tokenizer, template, cfg.data.max_length,
                                              shows_progress(cfg.logging))
        evaluation, eval_dropped, eval_report = [], 0, None
        if cfg.data.eval_files:
            eval_pairs, eval_report = load_preferences(cfg.data.eval_files, cfg.loss.top_k, cfg.loss.bottom_k)
            evaluation, eval_dropped = tokenize_pairs(eval_pairs, tokenizer, template, cfg.data.max_length,
                                                      shows_progress(cfg.logging))
        if not train:
            raise DataError(f"every training pair is longer than data.max_length={cfg.data.max_length}")
        if cfg.data.eval_files and not evaluation:  # the reward statistics would come from the training pairs
            raise DataError(f"data.eval_files: every evaluation pair is longer than data.max_length={cfg.data.max_length}")
    llama, params = init_score_params(cfg, len(tokenizer), partitioner)
    buckets = bucket_lengths(cfg.data.bucket_boundaries, cfg.data.max_length)
    pad_id = pad_token_id(tokenizer)
    batches = BatchIterator(train, batch_size=cfg.data.batch_size, buckets=buckets, pad_id=pad_id,
                            seed=cfg.data.shuffle_seed, group_by_length=cfg.data.group_by_length,
                            collate_fn=collate_pairs)
    total_steps = cfg.training.steps or cfg.training.epochs * batches.batches_per_epoch
    tx = make_optimizer(cfg.optimizer, total_steps)
    state = partitioner.init_state(lambda p: init_train_state(p, tx, cfg.training.seed), params)
    del params  # the state holds its own copy: this one would stay on the devices for the whole run
    state_shardings = partitioner.shardings(state)

    report = [f"train: {train_report.summary()}; {train_dropped} pairs longer than max_length dropped"]
    if eval_report is not None:
        report.append(f"eval: {eval_report.summary()}; {eval_dropped} pairs longer than max_length dropped")
    state, checkpointer = open_run(cfg, "reward", state, state_shardings, batches, report)
    out = cfg.training.output_dir

    graphdef, _ = abstract_model(llama, "score")
    step_fn = make_train_step(graphdef, tx, learning_rate_schedule(cfg.optimizer, total_steps),
                              cfg.optimizer.grad_accum_steps, cfg.loss.type, cfg.loss.margin,
                              partitioner=partitioner, state_shardings=state_shardings)
    stats_fn = make_eval_fn(graphdef, cfg.loss.type, cfg.loss.margin, evaluation or train, cfg.data.batch_size,
                            buckets, pad_id, partitioner, state_shardings.params, shows_progress(cfg.logging))
    result = train_loop(
        state=state, step_fn=lambda s, b: step_fn(s, partitioner.shard_batch(b)),
        batches=batches, total_steps=total_steps, checkpointer=checkpointer,
        meta_fn=data_position_meta(batches),
        training=cfg.training, logging=cfg.logging, output_dir=out,
        eval_fn=stats_fn if evaluation else None, desc="reward",
        tokens_fn=lambda b: int(b["attention_mask"][b["weight"] > 0].sum()))  # filler pairs not counted
    checkpointer.close()
    result.raise_if_stopped(checkpointer)
    stats = result.final_eval or stats_fn(result.state)  # the loop evaluated the final state, or the train split
    reward_stats = {"score_mean": stats["score_mean"], "score_std": stats["score_std"],
                    "accuracy": stats["accuracy"], "split": "eval" if evaluation else "train",
                    **(eval_report if evaluation else train_report).metrics()}  # the counts of that split
    save_model(llama, result.state.params, os.path.join(out, "final"), tokenizer=tokenizer, kind="score",
               extra_json={REWARD_STATS_FILE: reward_stats})
    return {**result.last_metrics, **{f"final/{k}": v for k, v in stats.items()}}

