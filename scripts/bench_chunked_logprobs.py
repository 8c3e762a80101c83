"""Chunked vs naive token log-probs: compiled temporary memory and wall time.

Memory comes from XLA's buffer assignment of the compiled function
(``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``), lowered from
``jax.ShapeDtypeStruct`` so nothing large is allocated. Speed is timed on a smaller shape
by default, because a full-size step takes minutes on a 2-core CPU.

    python scripts/bench_chunked_logprobs.py            # defaults: B=8 T=1024 V=32000 H=4096
    python scripts/bench_chunked_logprobs.py --speed-shape 2 256 32000 1024 --speed-chunk 128
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from icegrt_jax.losses import chunked_token_logprobs, token_logprobs

MIB = 2**20


def naive(hidden, lm_head, targets):
    logits = jnp.dot(hidden, lm_head, preferred_element_type=jnp.float32)
    return token_logprobs(logits, targets)


def chunked(chunk_size):
    return lambda hidden, lm_head, targets: chunked_token_logprobs(
        hidden, lm_head, targets, chunk_size
    )


def with_grad(fn):
    """Forward + backward as in training: gradients of sum(logprobs) w.r.t. hidden and W."""
    return jax.value_and_grad(lambda h, w, t: jnp.sum(fn(h, w, t)), argnums=(0, 1))


def abstract_inputs(batch, seq, vocab, hidden, dtype):
    return (
        jax.ShapeDtypeStruct((batch, seq, hidden), dtype),
        jax.ShapeDtypeStruct((hidden, vocab), dtype),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
    )


def temp_mib(fn, inputs):
    compiled = jax.jit(fn).lower(*inputs).compile()
    return compiled.memory_analysis().temp_size_in_bytes / MIB


def best_seconds(fns, inputs, repeats):
    """Best-of-``repeats`` wall time of each function, runs interleaved so that load from
    other processes on a shared machine hits all of them alike."""
    jitted = [jax.jit(fn) for fn in fns]
    for fn in jitted:
        jax.block_until_ready(fn(*inputs))  # compile + warm up
    best = [float("inf")] * len(jitted)
    for _ in range(repeats):
        for k, fn in enumerate(jitted):
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def memory_table(shape, chunk_sizes, dtype):
    inputs = abstract_inputs(*shape, dtype)
    print(f"\n### Temporary memory, B,T,V,H = {shape}, {jnp.dtype(dtype).name} (MiB)\n")
    print("| function | forward | forward+backward | fwd ratio | fwd+bwd ratio |")
    print("|---|---:|---:|---:|---:|")
    base_fwd, base_grad = temp_mib(naive, inputs), temp_mib(with_grad(naive), inputs)
    print(f"| naive (full logits) | {base_fwd:.1f} | {base_grad:.1f} | 1.000 | 1.000 |")
    for chunk_size in chunk_sizes:
        fwd = temp_mib(chunked(chunk_size), inputs)
        grad = temp_mib(with_grad(chunked(chunk_size)), inputs)
        print(
            f"| chunked, chunk_size={chunk_size} | {fwd:.1f} | {grad:.1f} | "
            f"{fwd / base_fwd:.3f} | {grad / base_grad:.3f} |"
        )


def speed_table(shape, chunk_size, repeats):
    batch, seq, vocab, hidden = shape
    rng = np.random.default_rng(0)
    inputs = (
        jnp.asarray(rng.normal(size=(batch, seq, hidden)), jnp.float32),
        jnp.asarray(rng.normal(size=(hidden, vocab)) / np.sqrt(hidden), jnp.float32),
        jnp.asarray(rng.integers(0, vocab, size=(batch, seq)), jnp.int32),
    )
    print(f"\n### Wall time, B,T,V,H = {shape}, float32, chunk_size={chunk_size}")
    print(f"(best of {repeats} interleaved runs after warm-up, seconds)\n")
    print("| function | naive | chunked | chunked / naive |")
    print("|---|---:|---:|---:|")
    for label, wrap in (("forward", lambda f: f), ("forward+backward", with_grad)):
        base, ours = best_seconds([wrap(naive), wrap(chunked(chunk_size))], inputs, repeats)
        print(f"| {label} | {base:.3f} | {ours:.3f} | {ours / base:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 1024, 32000, 4096],
                        metavar=("B", "T", "V", "H"), help="memory-analysis shape")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--speed-shape", type=int, nargs=4, default=[2, 256, 32000, 1024],
                        metavar=("B", "T", "V", "H"))
    parser.add_argument("--speed-chunk", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    for dtype in (jnp.float32, jnp.bfloat16):
        memory_table(tuple(args.shape), args.chunk_sizes, dtype)
    speed_table(tuple(args.speed_shape), args.speed_chunk, args.repeats)


if __name__ == "__main__":
    main()
