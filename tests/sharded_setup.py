"""What the sharded checks share: the meshes, the tiny model and configs, and how differences are
measured. Imported after ``sharded_checks`` has set XLA_FLAGS (8 host devices)."""

import jax
import numpy as np

from icegrt_jax.config import MeshConfig, OptimizerConfig, PPOConfig, RolloutConfig
from icegrt_jax.models.llama import LlamaConfig
from icegrt_jax.sharding import Partitioner

MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}
MODEL_MESHES = ("2x4x1", "2x2x2")  # the reward and PPO update checks' meshes
MODEL = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=128)
BATCH, LENGTH, ACCUM, STEPS = 16, 32, 2, 2
OPTIMIZER = OptimizerConfig(lr=1e-3, warmup_steps=0, schedule="constant", grad_accum_steps=ACCUM)
PPO = PPOConfig(actor_optimizer=OPTIMIZER, critic_optimizer=OPTIMIZER, rollout=RolloutConfig(temperature=0.9))
SCORER = "ppo_scorers:letter_e_share"  # tests/ppo_scorers.py


def partitioner(shape) -> Partitioner:
    return Partitioner.from_config(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))


def max_difference(a, b, relative=False) -> float:
    """max |a - b| over all leaves; relative: each leaf's divided by its max |b|."""
    def leaf(x, y):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        scale = max(float(np.max(np.abs(y))), 1e-30) if relative else 1.0
        return float(np.max(np.abs(x - y))) / scale

    return max(jax.tree.leaves(jax.tree.map(leaf, a, b)))


def max_relative(values, reference) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(values, reference))


def norm_of_difference(a, b) -> float:
    """Global L2 norm of a - b over the arrays of two trees (scalars such as step counts left out)."""
    squares = [np.sum(np.square(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if np.ndim(x)]
    return float(np.sqrt(sum(squares)))
