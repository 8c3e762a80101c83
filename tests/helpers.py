"""Shared builders for tests: tiny random HF LLaMA checkpoints and reference forwards."""

from __future__ import annotations

import numpy as np
import torch
import transformers


def make_hf_llama(path, *, vocab=96, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=112,
                  tied=False, seed=0, dtype=torch.float32, rope_theta=10000.0) -> transformers.LlamaForCausalLM:
    """A random tiny ``LlamaForCausalLM`` saved with ``save_pretrained`` (safetensors) to ``path``."""
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=rope_theta, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # HF's init is std 0.02: widen it so logits are O(1) and differences show
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model


def left_padded_batch(lengths, total, vocab, seed=0):
    """(ids, mask) int64 arrays: row i has lengths[i] random tokens right-aligned in ``total``."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = rng.integers(3, vocab, n)
        mask[row, total - n:] = 1
    return ids, mask


def hf_logits(model, ids, mask) -> np.ndarray:
    """transformers' logits with the position ids HF's generate derives: cumsum(mask) - 1."""
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions).logits.float().numpy()


KILLER = """
import os, signal, sys, importlib, time
from icegrt_jax.checkpoint import TrainCheckpointer
module = importlib.import_module(sys.argv[1])
factory, kill_on_call, sig = sys.argv[2], int(sys.argv[3]), getattr(signal, sys.argv[4])
output_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("training.output_dir="))
make = getattr(module, factory)
calls = 0

def wait_for_a_committed_checkpoint():
    checkpoints = TrainCheckpointer(os.path.join(output_dir, "checkpoints"))
    deadline = time.time() + 60
    while checkpoints.latest_step() is None and time.time() < deadline:
        time.sleep(0.05)
        checkpoints = TrainCheckpointer(os.path.join(output_dir, "checkpoints"))

def make_killing_step(*args, **kwargs):
    step = make(*args, **kwargs)
    def killing_step(*step_args):
        global calls
        calls += 1
        if calls == kill_on_call:
            wait_for_a_committed_checkpoint()
            os.kill(os.getpid(), sig)
        return step(*step_args)
    return killing_step
setattr(module, factory, make_killing_step)
from icegrt_jax.cli import main
sys.exit(main(sys.argv[5:]))
"""


def run_cli_killed_at(trainer_module: str, kill_on_call: int, sig: str, cli_args: list[str],
                      factory: str = "make_train_step"):
    """Run ``icegrt *cli_args`` in a subprocess that sends itself ``sig`` (e.g. "SIGKILL") on the
    ``kill_on_call``-th call of the function ``trainer_module.<factory>`` builds, once at least
    one checkpoint has committed (a later asynchronous save may still be in flight)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-c", KILLER, trainer_module, factory, str(kill_on_call), sig, *cli_args]
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
