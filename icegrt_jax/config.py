"""Typed run configuration: the dataclass schemas of every run (``config_loader`` reads them
from YAML with dotted command-line overrides; ``ConfigError`` names the source and dotted key).

The section dataclasses (``ModelConfig``, ``OptimizerConfig``, ...) are generic so reward-model and
PPO schemas can compose them the same way ``SFTConfig`` does; ``load_config`` takes any schema.
Each section's ``problems()`` yields (key, message) for inconsistent values.
"""

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from icegrt_jax.errors import UserInputError

Schema = TypeVar("Schema")
Problems = Iterator[tuple[str, str]]  # (key relative to the section, message); "" = the section

MESH_AXES = ("data", "fsdp", "tensor")


class ConfigError(UserInputError):
    """A configuration we cannot use; the one-line message names the source and the dotted key."""


# The smallest positive sampling temperature: below it z / T overflows or T underflows in fp32 for
# ordinary logits (vLLM's sampling epsilon). Temperature 0 means greedy.
MIN_TEMPERATURE = 1e-5


def choice(default: str, *allowed: str) -> Any:
    """A string field restricted to ``allowed`` (checked by ``load_config``)."""
    return field(default=default, metadata={"choices": allowed})


def list_of(*items: Any) -> Any:
    """A list field defaulting to (a fresh copy of) ``items``."""
    return field(default_factory=lambda: [list(i) if isinstance(i, list) else i for i in items])


@dataclass
class ModelConfig:
    """The model: an HF LLaMA/Vicuna directory (``hf_path``) or a built-in preset, and numerics.

    Exactly one of ``hf_path`` and ``preset`` is set. The optional architecture fields override
    the preset's (or the HF config's) values when not null.
    """

    hf_path: str | None = None
    preset: str | None = None
    dtype: str = choice("float32", "float32", "bfloat16")  # compute dtype
    param_dtype: str = choice("float32", "float32", "bfloat16")
    scan_layers: bool = True
    remat: str = choice("none", "none", "full", "dots")
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    max_position_embeddings: int | None = None

    def architecture_overrides(self) -> dict[str, int]:
        """The architecture fields that are set, as keyword arguments for the model config."""
        names = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def problems(self) -> Problems:
        if (self.hf_path is None) == (self.preset is None):
            yield "", "set exactly one of 'hf_path' and 'preset'"
        for name, value in self.architecture_overrides().items():
            if value < 1:
                yield name, f"must be >= 1, got {value}"


@dataclass
class OptimizerConfig:
    """AdamW with warmup then a decay schedule, global-norm clipping and gradient accumulation.

    The learning rate rises linearly from 0 to ``lr`` over ``warmup_steps``, then follows
    ``schedule`` down to ``lr * min_lr_ratio`` at the last step (``constant`` stays at ``lr``).
    ``grad_accum_steps``: a step's batch runs as that many micro-batches, their gradients averaged.
    """

    lr: float = 2e-5
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = choice("cosine", "cosine", "linear", "constant")
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0  # null: no clipping
    grad_accum_steps: int = 1

    def problems(self) -> Problems:
        yield from _at_least(self, 0, "lr", "weight_decay", "warmup_steps")
        yield from _at_least(self, 1, "grad_accum_steps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            yield "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"
        yield from _positive_or_null(self, "max_grad_norm")


@dataclass
class DataConfig:
    """Training data, prompt template, tokenizer and batching.

    Files: local ``.jsonl``, ``.parquet``, ``.arrow``, a ``save_to_disk`` directory, or a hub
    dataset name (``org/name`` or ``org/name:split``). ``tokenizer_path`` defaults to
    ``model.hf_path``. ``truncation`` handles examples longer than ``max_length``:
    ``drop_example`` drops them; ``drop_earliest_rounds`` removes whole earliest rounds (the
    template preamble stays) until the example fits and drops it only when its last round alone
    is too long. Either way the counts are reported. A batch holds ``batch_size`` examples, one
    optimizer step's (split into ``optimizer.grad_accum_steps`` micro-batches of
    ``batch_size / grad_accum_steps``, which the data-parallel size must divide), padded to the
    smallest bucket that fits; the buckets are the ``bucket_boundaries`` below ``max_length``, then
    ``max_length``. ``group_by_length`` batches examples of a bucket together (less padding).
    """

    train_files: list[str] = list_of()
    eval_files: list[str] = list_of()
    tokenizer_path: str | None = None
    template: str = choice("icegrt", "icegrt", "raw")
    max_length: int = 2048
    truncation: str = choice("drop_example", "drop_example", "drop_earliest_rounds")
    batch_size: int = 8
    bucket_boundaries: list[int] = list_of(256, 512, 1024, 2048)
    group_by_length: bool = True
    shuffle_seed: int = 0

    def problems(self) -> Problems:
        yield from _at_least(self, 1, "max_length", "batch_size")
        yield from _at_least(self, 0, "shuffle_seed")
        bounds = self.bucket_boundaries
        if any(b < 1 for b in bounds) or any(a >= b for a, b in itertools.pairwise(bounds)):
            yield "bucket_boundaries", f"must be positive and strictly increasing, got {bounds}"


@dataclass
class TrainingConfig:
    """Run length, seeds and cadences (in optimizer steps).

    The run lasts ``epochs`` passes over the training data unless ``steps`` is set, in which case
    it lasts exactly ``steps`` optimizer steps (PPO: iterations). Evaluation runs every ``eval_every``
    steps and at the last only with held-out data: ``data.eval_files`` (SFT, reward) or
    ``data.eval_prompt_files`` (PPO).
    """

    epochs: int = 1
    steps: int | None = None
    seed: int = 0
    eval_every: int = 500
    save_every: int = 1000
    keep_checkpoints: int = 3
    output_dir: str = "runs/sft"  # the reward and PPO configs default to runs/reward and runs/ppo
    log_every: int = 10

    def problems(self) -> Problems:
        yield from _at_least(self, 1, "epochs", "eval_every", "save_every", "keep_checkpoints",
                             "log_every")
        if self.steps is not None and self.steps < 1:
            yield "steps", f"must be >= 1 or null, got {self.steps}"


@dataclass
class MeshConfig:
    """Device mesh sizes (one may be -1: all remaining devices) and logical-axis sharding rules.

    Each rule is ``[logical_axis, mesh_axis, ...]``: the logical axis is sharded over the product of
    the listed mesh axes, or replicated when the only mesh axis is null. The logical names are the
    ones the model puts on its parameters (``models/llama.py``) plus ``batch`` and ``length``.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: list[list[str | None]] = list_of(
        ["batch", "data", "fsdp"],
        ["length", None],
        ["vocab", "tensor"],
        ["embed", "fsdp"],
        ["heads", "tensor"],
        ["kv_heads", "tensor"],
        ["mlp", "tensor"],
        ["head_dim", None],
        ["layers", None],
        ["norm", None],
    )

    def axis_rules(self) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
        """The rules in flax's ``logical_axis_rules`` form: ``(logical, mesh_axis | axes | None)``."""
        return tuple((logical, axes[0] if len(axes) == 1 else tuple(axes))
                     for logical, *axes in self.rules)

    def problems(self) -> Problems:
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        for name, size in sizes.items():
            if size == 0 or size < -1:
                yield name, f"must be >= 1 or -1, got {size}"
        if list(sizes.values()).count(-1) > 1:
            yield "", "at most one mesh axis may be -1"
        for i, rule in enumerate(self.rules):
            logical, *axes = rule if rule else [None]
            if logical is None or not axes or (None in axes and len(axes) > 1):
                yield f"rules[{i}]", f"expected [logical, mesh_axis, ...] or [logical, null], got {rule}"
            elif unknown := [a for a in axes if a is not None and a not in MESH_AXES]:
                yield f"rules[{i}]", f"unknown mesh axis {unknown[0]!r}; expected one of {MESH_AXES}"


@dataclass
class LoggingConfig:
    """Metric sinks: a JSON-lines file (``metrics.jsonl``), TensorBoard event files
    (``tensorboard/``), and a progress bar on the terminal."""

    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True


@dataclass
class SFTConfig:
    """ICE-Instruct supervised fine-tuning run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def problems(self) -> Problems:
        if self.data.tokenizer_path is None and self.model.hf_path is None:
            yield "data.tokenizer_path", "required when model.hf_path is not set"


DEFAULT_MARGINS = {"margin_ranking": 1.0, "bradley_terry": 0.0}  # RewardLossConfig.margin when null


@dataclass
class RewardLossConfig:
    """The reward model's pairwise loss and how rankings become pairs (paper section 3.2).

    ``margin_ranking``: max(0, margin - R(s, a_i) + R(s, a_j)) (the paper's); ``bradley_terry``:
    -log sigmoid(R(s, a_i) - R(s, a_j) - margin). ``margin`` null (the default) is the type's
    ``DEFAULT_MARGINS`` value: 1 for margin ranking, 0 for Bradley-Terry (its standard form, as in
    TRL and OpenRLHF); a given margin is used with either type. Rankings give the ``top_k`` best x
    ``bottom_k`` worst responses as (better, worse) pairs.
    """

    type: str = choice("margin_ranking", "margin_ranking", "bradley_terry")
    margin: float | None = None
    top_k: int = 2
    bottom_k: int = 2

    def problems(self) -> Problems:
        yield from _at_least(self, 1, "top_k", "bottom_k")
        yield from _at_least(self, 0, "margin")


@dataclass
class RewardConfig:
    """ICE-Reward: a scalar-head model trained on ranked responses.

    ``model`` initialises the backbone (an SFT checkpoint, an HF LLaMA directory, or a preset
    from scratch); the score head is always fresh. ``data.batch_size`` counts pairs.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(output_dir="runs/reward"))
    mesh: MeshConfig = field(default_factory=MeshConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):  # here, not in RewardLossConfig: OmegaConf builds the schema's default loss section
        if self.loss.margin is None:  # the run's config (and its saved config.yaml) holds the margin it uses
            self.loss.margin = DEFAULT_MARGINS[self.loss.type]

    def problems(self) -> Problems:
        yield from SFTConfig.problems(self)


@dataclass
class PromptDataConfig:
    """PPO prompts: records with a ``prompt`` field (other fields are ignored), rendered with the
    training template's prompt segment; prompts longer than ``max_prompt_length`` tokens are
    dropped and counted. ``prompts_per_iteration`` prompts are sampled per PPO iteration.
    ``eval_prompt_files`` (same format): held-out prompts whose greedy responses are scored every
    ``training.eval_every`` iterations and at the last (none: no evaluation)."""

    prompt_files: list[str] = list_of()
    eval_prompt_files: list[str] = list_of()
    tokenizer_path: str | None = None
    template: str = choice("icegrt", "icegrt", "raw")
    max_prompt_length: int = 512
    prompts_per_iteration: int = 64
    shuffle_seed: int = 0

    def problems(self) -> Problems:
        yield from _at_least(self, 1, "max_prompt_length", "prompts_per_iteration")


@dataclass
class RolloutConfig:
    """How the actor samples responses; ``max_new_tokens`` is the maximum response length, and a
    response ends at the first of ``stop_token_ids`` (kept as its last token). ``old_logprobs``:
    ``recompute`` them with a forward pass of the actor over the rollout (as OpenRLHF, Tunix), or
    take the ``sampler``'s (as TRL; one forward fewer; needs top_k 0 and top_p 1, where both are
    log_softmax(logits / T); they differ only by rounding, the decode path's attention runs over
    the KV cache, so the first update's ratio is 1 up to rounding and the KL to a reference equal
    to the actor is that rounding, not exactly 0: larger in bf16). ``micro_batch_size``: prompts
    generated, and rollout rows scored by each scoring forward, at a time (OpenRLHF's micro
    rollout batch): it bounds the KV cache and the scoring activations (not the fused update
    programs', whose forwards run over their minibatch); with FSDP each piece gathers the weights
    again. null: all of an iteration's at once."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: list[int] | None = None  # null: the tokenizer's EOS; []: always max_new_tokens
    old_logprobs: str = choice("recompute", "recompute", "sampler")
    micro_batch_size: int | None = None

    def problems(self) -> Problems:
        if not self.temperature >= MIN_TEMPERATURE:
            yield "temperature", f"must be >= {MIN_TEMPERATURE} for PPO (log-probs divide by it), got {self.temperature}"
        if not 0 < self.top_p <= 1:
            yield "top_p", f"must be in (0, 1], got {self.top_p}"
        if self.old_logprobs == "sampler" and (self.top_k or self.top_p < 1):
            yield "old_logprobs", ("'sampler' needs top_k 0 and top_p 1 (with filtering the sampler's log-probs "
                                   "are of the filtered distribution, not the one PPO's ratio uses)")
        yield from _at_least(self, 0, "top_k")
        yield from _at_least(self, 1, "max_new_tokens")
        if self.micro_batch_size is not None:
            yield from _at_least(self, 1, "micro_batch_size")


@dataclass
class RewardModelConfig:
    """The frozen reward model R(s, a): a saved ICE-Reward checkpoint (``path``) or a Python scorer
    ``function: "module:function"`` called as ``f(prompts: list[str], responses: list[str]) ->
    list[float]`` (on process 0 of a multi-process run, which broadcasts the scores). ``normalize``: ``none``; ``stats`` uses the checkpoint's reward_stats.json
    (score - mean) / std (over its held-out pairs' chosen and rejected scores, each response
    counted once a pair it is in: the paper's top-2 x bottom-2 weighs the four alike); ``running`` uses running moments of the scores seen so far. Then
    ``clip`` bounds |score| (set it with ``stats`` from a small held-out set: its std can be small and
    the policy's scores far from its mean; PPO warns once when such scores pass +-10 unclipped), and ``missing_eos_penalty`` is subtracted from responses
    that never emitted EOS (truncated at the maximum response length)."""

    path: str | None = None
    function: str | None = None
    normalize: str = choice("none", "none", "stats", "running")
    clip: float | None = None
    missing_eos_penalty: float | None = None

    def problems(self) -> Problems:
        if (self.path is None) == (self.function is None):
            yield "", "set exactly one of 'path' and 'function'"
        if self.normalize == "stats" and self.path is None:
            yield "normalize", "'stats' needs a reward model checkpoint ('path')"
        yield from _positive_or_null(self, "clip")


@dataclass
class PPOLossConfig:
    """PPO with GAE and KL control (paper section 3.3; clip_eps and gamma default to section 4's
    values, the rest, which the paper does not state, to common ones).

    Per iteration: ``epochs`` passes over the rollouts in ``minibatches`` shuffled minibatches,
    each split into ``optimizer.grad_accum_steps`` micro-batches. KL control: ``kl_target`` null
    keeps ``kl_coef`` fixed, else the adaptive controller of Ziegler et al. (2019) with
    ``kl_horizon``. ``critic_warmup_iterations``: the first iterations update the critic only.
    ``critic_init``: ``actor`` (ICE-Instruct backbone, fresh value head, as in the paper) or
    ``reward`` (the reward model, head included; it must have the policy's tokenizer). ``gamma``
    0.95 is the paper's, applied per token: the end-of-response score reaches a response's first
    token scaled by gamma^length, a pull to shorter responses; OpenRLHF, TRL and DeepSpeed-Chat
    default to 1.0, and docs/bench_demo.md ("PPO tuning") measured 0.95 harmful on the demo (which
    sets 1.0).
    """

    epochs: int = 1
    minibatches: int = 1
    clip_eps: float = 0.2
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    gamma: float = 0.95
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: int = 10000
    kl_estimator: str = choice("k1", "k1", "k2", "k3")
    whiten_advantages: bool = True
    entropy_coef: float = 0.0
    aggregate: str = choice("token_mean", "token_mean", "seq_mean_token_mean")
    critic_warmup_iterations: int = 0
    critic_init: str = choice("actor", "actor", "reward")

    def problems(self) -> Problems:
        yield from _at_least(self, 1, "epochs", "minibatches", "kl_horizon")
        yield from _at_least(self, 0, "kl_coef", "entropy_coef", "critic_warmup_iterations")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                yield name, f"must be in [0, 1], got {getattr(self, name)}"
        if not 0 < self.clip_eps < 1:
            yield "clip_eps", f"must be in (0, 1), got {self.clip_eps}"
        if self.dual_clip is not None and self.dual_clip <= 1:
            yield "dual_clip", f"must be > 1 or null, got {self.dual_clip}"
        yield from _positive_or_null(self, "value_clip", "kl_target")


@dataclass
class PPOConfig:
    """ICE-GRT: PPO with actor, critic, frozen reference and frozen reward model.

    ``model`` is ICE-Instruct: it initialises the actor and the reference (and the critic's
    backbone). ``training.steps`` counts PPO iterations (default: one pass over the prompts).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    actor_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-6))
    critic_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-7))
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardModelConfig = field(default_factory=RewardModelConfig)
    ppo: PPOLossConfig = field(default_factory=PPOLossConfig)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(output_dir="runs/ppo"))
    mesh: MeshConfig = field(default_factory=MeshConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def problems(self) -> Problems:
        yield from SFTConfig.problems(self)
        if self.ppo.critic_init == "reward" and self.reward.path is None:
            yield "ppo.critic_init", "'reward' needs reward.path"
        rows = self.data.prompts_per_iteration
        step_rows = self.ppo.minibatches * math.lcm(self.actor_optimizer.grad_accum_steps,
                                                    self.critic_optimizer.grad_accum_steps)
        if rows % step_rows:
            yield "data.prompts_per_iteration", (f"{rows} is not divisible by ppo.minibatches x "
                                                 f"grad_accum_steps = {step_rows}")
        if (micro := self.rollout.micro_batch_size) and micro > 0 and rows % micro:
            yield "rollout.micro_batch_size", f"{micro} does not divide data.prompts_per_iteration {rows}"
        if self.ppo.kl_target is not None and rows > 5 * self.ppo.kl_horizon:  # the update's factor 1 + e n / horizon
            yield "ppo.kl_horizon", (f"{self.ppo.kl_horizon} is under data.prompts_per_iteration / 5 = {rows / 5:g}: "
                                     "one adaptive update could make the KL coefficient negative")


def _at_least(cfg: Any, minimum: int, *names: str) -> Problems:
    for name in names:
        if getattr(cfg, name) < minimum:
            yield name, f"must be >= {minimum}, got {getattr(cfg, name)}"


def _positive_or_null(cfg: Any, *names: str) -> Problems:
    for name in names:
        if (value := getattr(cfg, name)) is not None and value <= 0:
            yield name, f"must be > 0 or null, got {value}"
