"""Train state as a pytree, the optimizer from config, and exact gradient accumulation.

Every jitted training step in the project is ``step(state, batch) -> (state, metrics)`` built
from the pieces here: ``accumulate_gradients`` (micro-batches scanned, gradients of summed losses
divided by the total weight, so accumulation is exact) and ``apply_gradients`` (optax update,
skipped when the loss or gradient norm is not finite).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from icegrt_jax.config import OptimizerConfig
from icegrt_jax.row_pieces import strided_pieces
from icegrt_jax.sharding import with_logical_constraint

NO_DECAY_MARKERS = ("norm",)


@flax.struct.dataclass
class TrainState:
    """step: optimizer updates applied; rng: raw PRNG key data (uint32), checkpointable."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def init_train_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over ``warmup_steps``, then cosine / linear decay to
    ``lr * min_lr_ratio`` at ``total_steps`` (or constant ``lr``)."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def weight_decay_mask(params):
    """True for parameters that get weight decay: everything but the RMSNorm scales."""

    def decays(path, _):
        names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return not any(marker in names for marker in NO_DECAY_MARKERS)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (when ``max_grad_norm`` is set) then AdamW on the schedule."""
    adamw = optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    if cfg.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)


SumLossFn = Callable[[Any, Any], tuple[jax.Array, tuple[jax.Array, dict]]]


def accumulate_gradients(sum_loss_fn: SumLossFn, params, micro_batches):
    """Gradient of sum_i L_i / sum_i n_i over micro-batches stacked on a leading axis.

    ``sum_loss_fn(params, micro_batch) -> (loss_sum, (weight, metric_sums))`` returns an
    unnormalised loss (e.g. summed token NLL) and its weight (e.g. token count). Since the
    weights do not depend on params, the result equals the gradient of the token mean over the
    whole batch, whatever the split. Returns (grads, loss_sum / W, W, metric_sums / W) with W
    the total weight.
    """
    grad_fn = jax.value_and_grad(sum_loss_fn, has_aux=True)

    def body(carry, micro_batch):
        grads_acc, loss_acc, weight_acc, metrics_acc = carry
        (loss_sum, (weight, metrics)), grads = grad_fn(params, micro_batch)
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
        return (grads_acc, loss_acc + loss_sum, weight_acc + weight, metrics_acc), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    if jax.tree.leaves(micro_batches)[0].shape[0] == 1:  # no loop, no zero-filled accumulators
        (loss_sum, (weight, metric_sums)), grads = grad_fn(params, first)
    else:
        metric_shapes = jax.eval_shape(lambda: sum_loss_fn(params, first)[1][1])
        # fp32 sums whatever the parameters' dtype (bf16 sums would drift with the micro-batch count)
        zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.zeros((), jnp.float32),
                 jnp.zeros((), jnp.float32),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
        (grads, loss_sum, weight, metric_sums), _ = jax.lax.scan(body, zeros, micro_batches)
    return means_from_sums(grads, loss_sum, weight, metric_sums)


def means_from_sums(grads, loss_sum, weight, metric_sums):
    """(grads / W, loss_sum / W, W, metric_sums / W) with W = max(weight, 1): the token means."""
    total = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / total, grads)
    return grads, loss_sum / total, weight, jax.tree.map(lambda m: m / total, metric_sums)


def apply_gradients(state: TrainState, grads, loss, tx: optax.GradientTransformation):
    """One optax update; when the loss or the gradient norm is not finite the state is returned
    unchanged and ``metrics["finite"]`` is 0, so the loop can stop with the last good state. A
    ``lax.cond``, not a select of the new and old states: the select kept both alive (a second
    copy of params and optimizer state, 2.8 GiB a device for the 13B actor on 8 x H100). Every
    leaf keeps its dtype (bf16 Adam moments of bf16 parameters stay bf16, as ``icegrt plan``
    counts them; the select had promoted them to fp32 after the first step)."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def step(old: TrainState) -> TrainState:
        updates, opt_state = tx.update(grads, old.opt_state, old.params)
        new = old.replace(step=old.step + 1, params=optax.apply_updates(old.params, updates), opt_state=opt_state)
        return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)  # fp32 gradients promote bf16 moments

    state = jax.lax.cond(finite, step, lambda old: old, state)
    return state, {"grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}


def split_micro_batches(batch: dict, accum_steps: int) -> dict:
    """[B, ...] -> [accum_steps, B / accum_steps, ...] for ``accumulate_gradients``: micro-batch
    a holds rows a, a + A, a + 2A, ... (A = accum_steps; ``row_pieces``), so rows laid out in
    blocks over the data-parallel devices stay on them when the data-parallel size divides B / A,
    as ``Partitioner.check_batch_size`` asks. The sums are exact whichever rows share one."""
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps {accum_steps}")
        return with_logical_constraint(strided_pieces(x, accum_steps), (None, "batch"))

    return jax.tree.map(split, batch)
