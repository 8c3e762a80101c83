"""icegrt-jax: ICE-GRT (ICE-Instruct SFT, ICE-Reward, ICE-GRT PPO) in JAX and Flax NNX."""

__version__ = "0.1.0"
