"""Sharded checks that rows stay on their data-parallel devices: the PPO scoring forwards in
pieces, the chunked LM-head log-probs, gradient-accumulation micro-batches (run by
``sharded_checks``)."""

import dataclasses
import functools
import re

import jax
import numpy as np
from flax import nnx
from sharded_setup import MODEL, PPO, max_difference, partitioner

from icegrt_jax import losses
from icegrt_jax.config import RolloutConfig
from icegrt_jax.models.heads import ScoreModel
from icegrt_jax.models.llama import Llama
from icegrt_jax.train import ppo, rollout
from icegrt_jax.train.state import split_micro_batches


def check_chunked_scoring() -> dict:
    """The trainer's scoring forwards on (2,2,2) over 16 rows, 4 at a time (each piece: one row
    of each of the 4 data-parallel blocks), against all rows at once on one device; and how many
    all-to-alls and collective-permutes the critic forward compiles to: over all rows, in strided
    pieces (``in_row_chunks``), and (a control) in contiguous pieces."""
    graphdef, params = nnx.split(Llama(MODEL, nnx.Rngs(4)))
    critic_graphdef, critic_params = nnx.split(ScoreModel(MODEL, nnx.Rngs(5)))
    rng = np.random.default_rng(6)
    tokens = rng.integers(3, MODEL.vocab_size, (16, 24)).astype(np.int32)
    mask = (np.arange(24)[None] >= rng.integers(0, 12, 16)[:, None]).astype(np.int32)  # left padding
    cfg = dataclasses.replace(PPO, rollout=RolloutConfig(micro_batch_size=4))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prompts_per_iteration=16))
    p = partitioner((2, 2, 2))
    results = {}
    for name, fn, g, prm, static in (("logprobs", rollout.sequence_logprobs_without_entropy, graphdef, params, (0.9, 12)),
                                     ("values", rollout.critic_values, critic_graphdef, critic_params, ())):
        single = fn(g, prm, tokens, mask, *static)
        chunked = p.jit(ppo.scoring_forward(fn, g, cfg), in_shardings=(
            p.shardings(prm), p.batch_sharding, p.batch_sharding), out_shardings=p.batch_sharding,
            static_argnums=tuple(range(3, 3 + len(static))))
        with p.activate():
            out = chunked(p.put(prm), *p.shard_batch((tokens, mask)), *static)
        results[name] = max_difference(out, single)
    values = functools.partial(rollout.critic_values, critic_graphdef)
    for name, forward in (("permutes_whole", values), ("permutes_chunked", rollout.in_row_chunks(values, 4)),
                          ("permutes_contiguous", contiguous_pieces(values, 4))):  # the last a control
        program = p.jit(forward, in_shardings=(p.shardings(critic_params), p.batch_sharding, p.batch_sharding),
                        out_shardings=p.batch_sharding)
        with p.activate():
            hlo = program.lower(p.put(critic_params), *p.shard_batch((tokens, mask))).compile().as_text()
        results[name] = len(re.findall(r"\b(all-to-all|collective-permute)(-start)?\(", hlo))
    return results


def contiguous_pieces(forward, chunks: int):
    """``in_row_chunks`` with piece i the i-th contiguous R / chunks rows (a control)."""
    def chunked(params, tokens, attention_mask):
        split = lambda x: x.reshape(chunks, -1, *x.shape[1:])
        out = jax.lax.map(lambda piece: forward(params, *piece), (split(tokens), split(attention_mask)))
        return out.reshape(-1, *out.shape[2:])

    return chunked


def check_chunked_logprobs_gathers() -> dict:
    """All-gathers in the chunked LM-head log-probs of 16 x 512 tokens laid out over 8
    data-parallel devices, forward and gradient (contiguous chunks of the flattened rows had put
    the row sharding on the loop axis: 6 and 3, each device computing every row's logits)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    rows, whole = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s)) for s in (("data",), ()))
    args = (jax.ShapeDtypeStruct((16, 512, 64), np.float32, sharding=rows),
            jax.ShapeDtypeStruct((64, 256), np.float32, sharding=whole),
            jax.ShapeDtypeStruct((16, 512), np.int32, sharding=rows))
    forward = functools.partial(losses.chunked_token_logprobs, chunk_size=1024)
    programs = {"forward": forward, "gradient": jax.grad(lambda *a: forward(*a).sum(), argnums=(0, 1))}
    return {name: len(re.findall(r"\ball-gather(-start)?\(", jax.jit(fn).lower(*args).compile().as_text()))
            for name, fn in programs.items()}


def micro_batch_row_moves() -> int:
    """All-to-alls and collective-permutes of splitting 64 rows over 8 data-parallel devices into
    4 micro-batches (contiguous micro-batches compiled 2: rows moved between devices)."""
    p = partitioner((8, 1, 1))
    split = jax.jit(lambda x: split_micro_batches({"x": x}, 4)["x"] * 2, in_shardings=p.batch_sharding)
    with p.activate():
        hlo = split.lower(jax.ShapeDtypeStruct((64, 8), np.float32, sharding=p.batch_sharding)).compile().as_text()
    return len(re.findall(r"\b(all-to-all|collective-permute)(-start)?\(", hlo))
