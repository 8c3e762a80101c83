"""ICE-Instruct: supervised fine-tuning with the loss on assistant tokens only (paper section 3.1).

Loss: L = sum_t m_t * -log p(y_t | x_<=t) / sum_t m_t over the whole (accumulated) batch, with
``m`` the batch's ``loss_mask``. Log-probs come from ``losses.chunked_token_logprobs`` so the
[B, T, V] logits are never materialised. Everything is validated (config, tokenizer, data,
model) before the output directory is touched; a rerun of the same command resumes from the
newest checkpoint and continues exactly as if it had not stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from icegrt_jax.checkpoint import save_model
from icegrt_jax.config import SFTConfig
from icegrt_jax.data.batching import (
    BatchIterator,
    bucket_lengths,
    eval_batches,
)
from icegrt_jax.data.sources import DataError, SourceReport, load_conversations
from icegrt_jax.data.templates import get_template
from icegrt_jax.data.tokenize import (
    pad_token_id,
    tokenize_conversations,
)
from icegrt_jax.hf import abstract_model, carried_generation_config
from icegrt_jax.losses import chunked_token_logprobs, masked_nll_sum
from icegrt_jax.sharding import Partitioner, all_or_none, initialize_distributed
from icegrt_jax.train.loop import (
    check_output_dir,
    data_position_meta,
    open_run,
    shows_progress,
    train_loop,
)
from icegrt_jax.train.model_init import init_model, run_tokenizer
from icegrt_jax.train.state import (
    accumulate_gradients,
    apply_gradients,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    split_micro_batches,
)

LOGPROB_CHUNK = 1024  # tokens per chunk of the LM-head projection


def batch_nll_sum(graphdef, params, batch):
    """(sum of -log p over loss_mask, number of loss tokens)."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    kernel = model.lm_head_kernel().astype(hidden.dtype)
    return masked_nll_sum(chunked_token_logprobs(hidden, kernel, batch["targets"], LOGPROB_CHUNK), batch["loss_mask"])


def make_train_step(graphdef, tx, schedule, accum_steps: int, *, partitioner: Partitioner | None = None,
                    state_shardings=None):
    """Jitted ``(state, batch) -> (state, metrics)``; the old state's buffers are donated.
    With a ``partitioner`` the step runs sharded (state laid out by ``state_shardings``)."""

    def sum_loss(params, micro_batch):
        nll, count = batch_nll_sum(graphdef, params, micro_batch)
        return nll, (count, {})

    def step(state, batch):
        micro = split_micro_batches(batch, accum_steps)
        grads, loss, tokens, _ = accumulate_gradients(sum_loss, state.params, micro)
        lr = schedule(state.step)
        state, metrics = apply_gradients(state, grads, loss, tx)
        return state, {"loss": loss, "loss_tokens": tokens, "lr": lr, **metrics}

    if partitioner is None:
        return jax.jit(step, donate_argnums=0)
    return partitioner.jit_train_step(step, state_shardings)


def counted_tokens(batch) -> int:
    """A batch's tokens, filler rows (no loss tokens: ``batching``) not counted."""
    return int(batch["attention_mask"][batch["loss_mask"].any(axis=1)].sum())


def make_eval_fn(graphdef, examples, batch_size, buckets, pad_id, partitioner: Partitioner | None = None,
                 param_shardings=None, progress: bool = False):
    """Held-out token-mean NLL and perplexity of a state's params (sharded with a ``partitioner``;
    ``progress``: a bar over each pass)."""
    nll = functools.partial(batch_nll_sum, graphdef)
    if partitioner is None:
        nll_fn, to_device = jax.jit(nll), lambda batch: {k: jnp.asarray(v) for k, v in batch.items()}
    else:
        nll_fn = partitioner.jit(nll, in_shardings=(param_shardings, partitioner.batch_sharding),
                                 out_shardings=partitioner.replicated)
        to_device = partitioner.shard_batch

    def evaluate(state) -> dict[str, float]:
        total, count = 0.0, 0.0
        for batch in eval_batches(examples, batch_size=batch_size, buckets=buckets, pad_id=pad_id, progress=progress):
            nll, n = nll_fn(state.params, to_device(batch))
            total, count = total + float(nll), count + float(n)
        loss = total / max(count, 1.0)
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}

    return evaluate


@dataclasses.dataclass
class PreparedData:
    tokenizer: object
    train: list
    eval: list
    reports: dict


def prepare_data(cfg: SFTConfig) -> PreparedData:
    """Tokenizer, tokenised train/eval examples and the truncation reports (nothing written)."""
    tokenizer = run_tokenizer(cfg)
    template = get_template(cfg.data.template)

    def tokenized(files):
        if not files:
            return [], None
        source = SourceReport()
        return tokenize_conversations(load_conversations(files, source), tokenizer, template,
                                      max_length=cfg.data.max_length, truncation=cfg.data.truncation,
                                      progress=shows_progress(cfg.logging), source=source)

    train, train_report = tokenized(cfg.data.train_files)
    evaluation, eval_report = tokenized(cfg.data.eval_files)
    return PreparedData(tokenizer, train, evaluation, {"train": train_report, "eval": eval_report})


def run_sft(cfg: SFTConfig) -> dict:
    """Train (or resume) an SFT run; returns the last metrics. Writes under training.output_dir:
    config.yaml, metrics.jsonl, checkpoints/, final/ (a project checkpoint with the tokenizer).
    Runs sharded over ``cfg.mesh``; a multi-process launch joins ``jax.distributed`` first."""
    initialize_distributed()
    check_output_dir(cfg.training.output_dir)  # before any model loads
    partitioner = Partitioner.from_config(cfg.mesh)
    partitioner.check_batch_size(cfg.data.batch_size, cfg.optimizer.grad_accum_steps)
    with all_or_none("loading the data"):  # a file one process cannot read stops every process
        data = prepare_data(cfg)
        for split, given, what in (("train", True, "training"), ("eval", bool(cfg.data.eval_files), "evaluation")):
            if given and not getattr(data, split):  # an eval set of nothing would log a loss of 0
                report = data.reports[split]
                why = (f"{report.summary()}; each starts with the template's {report.head_tokens} preamble tokens"
                       if report is not None and report.examples else "the files are empty")
                files = getattr(cfg.data, f"{split}_files")
                raise DataError(f"data.{split}_files {', '.join(files) or '(none given)'}: no {what} examples ({why})")
    llama, params = init_model(cfg.model, cfg.training.seed, partitioner, min_vocab=len(data.tokenizer),
                               progress=shows_progress(cfg.logging))
    buckets = bucket_lengths(cfg.data.bucket_boundaries, cfg.data.max_length)
    pad_id = pad_token_id(data.tokenizer)
    batches = BatchIterator(data.train, batch_size=cfg.data.batch_size, buckets=buckets, pad_id=pad_id,
                            seed=cfg.data.shuffle_seed, group_by_length=cfg.data.group_by_length)
    total_steps = cfg.training.steps or cfg.training.epochs * batches.batches_per_epoch
    tx = make_optimizer(cfg.optimizer, total_steps)
    state = partitioner.init_state(lambda p: init_train_state(p, tx, cfg.training.seed), params)
    del params  # the state holds its own copy: this one would stay on the devices for the whole run
    state_shardings = partitioner.shardings(state)

    state, checkpointer = open_run(cfg, "sft", state, state_shardings, batches,
                                   [f"{split} data: {report.summary()}" for split, report in data.reports.items()
                                    if report is not None])

    graphdef, _ = abstract_model(llama)
    step_fn = make_train_step(graphdef, tx, learning_rate_schedule(cfg.optimizer, total_steps),
                              cfg.optimizer.grad_accum_steps, partitioner=partitioner,
                              state_shardings=state_shardings)
    eval_fn = (make_eval_fn(graphdef, data.eval, cfg.data.batch_size, buckets, pad_id, partitioner,
                            state_shardings.params, shows_progress(cfg.logging)) if data.eval else None)
    result = train_loop(
        state=state, step_fn=lambda s, b: step_fn(s, partitioner.shard_batch(b)),
        batches=batches, total_steps=total_steps, checkpointer=checkpointer,
        meta_fn=data_position_meta(batches),
        training=cfg.training, logging=cfg.logging, output_dir=cfg.training.output_dir, eval_fn=eval_fn,
        tokens_fn=counted_tokens, desc="sft")
    checkpointer.close()
    result.raise_if_stopped(checkpointer)
    save_model(llama, result.state.params, os.path.join(cfg.training.output_dir, "final"), tokenizer=data.tokenizer,
               extra_json=carried_generation_config(cfg.model.hf_path, llama))
    return result.last_metrics
