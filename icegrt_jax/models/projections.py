"""Matmuls with written-out backward passes (custom VJPs) for the model's projections.

A weight gradient dW = x^T dy contracts the token axis, and XLA:CPU's matmuls want the left
operand token-minor, so one operand gets transposed. From autodiff's graph XLA picked the wide
one, and fused its computation into the transpose: the SiLU gradient [tokens, I] or the softmax
gradient [tokens, V] computed in a strided loop, ~10 ms a layer on bench-small's PPO update (30x a
plain pass). ``weight_gradient`` transposes the narrower of x and dy (and then, if that was dy,
the small [I, O] result): bench-small's PPO update (actor + critic step) runs ~1.25x faster on
CPU. The values are autodiff's up to float rounding. The outputs carry the checkpoint name
``PROJECTION`` so that a remat policy can keep them (the dots policy cannot see inside a custom
VJP; see ``llama._remat``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def weight_gradient(x, dy):
    """dW = x^T dy [I, O] for x [..., I], dy [..., O], summed over every leading axis; the
    narrower of x, dy is the transposed (left) operand of the matmul."""
    x, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    if x.shape[1] <= dy.shape[1]:
        return jnp.einsum("ti,to->io", x, dy)
    return jnp.einsum("to,ti->oi", dy, x).T


PROJECTION = "projection"  # the checkpoint name of the outputs (see the module docstring)


def dense(x, w, out_dtype=None):
    """x [..., I] @ w [I, O], accumulated in (and returned as) ``out_dtype`` when given; the
    backward is dx = dy w^T and dW = ``weight_gradient(x, dy)``, each computed in the promoted
    dtype of its operands and cast to x's and w's."""
    return checkpoint_name(_dense(x, w, out_dtype), PROJECTION)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x, w, out_dtype):
    return jnp.einsum("...i,io->...o", x, w, preferred_element_type=out_dtype)


def _dense_forward(x, w, out_dtype):
    return _dense(x, w, out_dtype), (x, w)


def _dense_backward(out_dtype, residuals, dy):
    x, w = residuals
    return jnp.einsum("...o,io->...i", dy, w).astype(x.dtype), weight_gradient(x, dy).astype(w.dtype)


_dense.defvjp(_dense_forward, _dense_backward)


def swiglu_mlp(h, w_gate, w_up, w_down):
    """SwiGLU feed-forward [B, T, H] -> [B, T, H]: (silu(h W_g) * h W_u) W_d, silu(g) = g sigmoid(g).

    The backward is written out (a custom VJP; with g = h W_g, u = h W_u, s = sigmoid(g),
    a = silu(g) u and dy the output's cotangent): da = dy W_d^T, dg = da u s (1 + g (1 - s)),
    du = da silu(g); dW_d = a^T dy, dW_g = h^T dg, dW_u = h^T du (``weight_gradient``), dh =
    dg W_g^T + du W_u^T. Residuals h, g, u, as autodiff keeps. The elementwise gradient runs in
    fp32, cast back to the compute dtype. One VJP for the block (not three ``dense``): its MLP
    forward + backward ran 1.07x faster on CPU. g, u and the output are named ``PROJECTION``."""
    return checkpoint_name(_swiglu_mlp(h, w_gate, w_up, w_down), PROJECTION)


@jax.custom_vjp
def _swiglu_mlp(h, w_gate, w_up, w_down):
    return jnp.einsum("bti,ih->bth", _swiglu_activation(h, w_gate, w_up)[0], w_down)


def _swiglu_activation(h, w_gate, w_up):
    """(a = silu(g) * u, g, u) with g = h W_g, u = h W_u."""
    gate = checkpoint_name(jnp.einsum("bth,hi->bti", h, w_gate), PROJECTION)
    up = checkpoint_name(jnp.einsum("bth,hi->bti", h, w_up), PROJECTION)
    return jax.nn.silu(gate) * up, gate, up


def _swiglu_forward(h, w_gate, w_up, w_down):
    activation, gate, up = _swiglu_activation(h, w_gate, w_up)
    return jnp.einsum("bti,ih->bth", activation, w_down), (h, gate, up, w_gate, w_up, w_down)


def _swiglu_backward(residuals, dy):
    h, gate, up, w_gate, w_up, w_down = residuals
    dt, f32 = h.dtype, jnp.float32
    g, u = gate.astype(f32), up.astype(f32)
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    da = jnp.einsum("bth,ih->bti", dy, w_down).astype(f32)
    d_gate = (da * u * sig * (1 + g * (1 - sig))).astype(dt)
    d_up = (da * silu).astype(dt)
    d_w_down = weight_gradient((silu * u).astype(dt), dy)
    d_w_gate = weight_gradient(h, d_gate)
    d_w_up = weight_gradient(h, d_up)
    d_h = jnp.einsum("bti,hi->bth", d_gate, w_gate) + jnp.einsum("bti,hi->bth", d_up, w_up)
    return (d_h.astype(dt), d_w_gate.astype(w_gate.dtype), d_w_up.astype(w_up.dtype),
            d_w_down.astype(w_down.dtype))


_swiglu_mlp.defvjp(_swiglu_forward, _swiglu_backward)
