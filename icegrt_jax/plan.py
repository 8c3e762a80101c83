"""Per-device memory plan of a PPO run (actor, critic, reference, reward model) on a mesh.

Nothing is allocated: every model is a ``jax.eval_shape`` tree and every step is compiled from
abstract arguments that carry their shardings, for the real depth (scanned layers keep compile
time flat), on ``N`` CPU devices standing in for the accelerators.

Per device and per role:

- params, optimizer state (AdamW moments in the param dtype), gradients (one param-shaped copy)
  and KV cache: exact, ``sum over leaves of prod(shard shape) x itemsize`` with the shard shapes
  the mesh rules give (the cache is the sampler's, ``init_cache(per_layer=True)``: per layer k
  [rows, kv_heads, P + N, D] and v [rows, kv_heads, D, P + N] for the rows generated at a time
  (``rollout.micro_batch_size``, default all), rows split by ``batch``, kv heads by ``kv_heads``);
- activations: the compiled program's ``memory_analysis().temp_size_in_bytes`` (everything that
  is neither an argument nor an output), minus the gradients for the update steps. The programs
  are the trainer's own: ``ppo_updates.make_actor_update`` / ``make_critic_update`` on a minibatch and
  ``rollout.sequence_logprobs`` (``_without_entropy`` for the reference) / ``critic_values`` /
  ``reward_model_scores`` on a rollout batch (``rollout.micro_batch_size`` rows at a time). With
  one epoch, one minibatch and no critic accumulation, in critic warm-up iterations or with actor
  accumulation, the trainer runs
  ``make_critic_update_with_values`` instead of ``critic_values`` + ``make_critic_update``: the
  same critic forward and backward plus the experience arrays ([rows, length] each), sized here
  by the separate critic update (an approximation by those few arrays). When the actor's step,
  too, is one step on the whole rollout (``ppo_updates.fuses_rollout_forwards``), ``make_joint_update``
  runs both updates in one program: its transient is counted as the sum of the two updates'
  (both models' gradients and activations live at once; XLA may reuse a little of it).

The steps run one after another, so the device peak is the resident state (all params and
optimizer states) plus the largest transient: generation (KV cache + the actor's forward, an
upper bound on the prefill, plus the sampler's per-layer copy of the actor's weights in the
compute dtype), scoring (each forward), or an update (gradients + activations).

Caveat: buffer assignment is the CPU compiler's; a GPU compile (other fusions, cuDNN attention
workspaces, collective buffers) differs by a few percent, so leave that much headroom.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from icegrt_jax.config import ConfigError, PPOConfig
from icegrt_jax.hf import abstract_model, load_hf_config
from icegrt_jax.models.llama import LAYER_CACHE_AXES, LlamaConfig, init_cache, preset
from icegrt_jax.sampling import NEW_TOKEN_BUCKETS, PROMPT_BUCKETS, bucket
from icegrt_jax.sharding import Partitioner
from icegrt_jax.train import ppo, ppo_updates, rollout
from icegrt_jax.train.model_init import frozen_config, model_config, with_numerics
from icegrt_jax.train.state import init_train_state, make_optimizer

GIB = 2 ** 30
PLAN_OPTIMIZER_STEPS = 1000  # the schedule's length does not change any buffer


@dataclasses.dataclass(frozen=True)
class RoleMemory:
    """Bytes per device of one PPO role."""

    role: str
    model: str
    params: int
    optimizer: int = 0
    gradients: int = 0
    kv_cache: int = 0
    decode_weights: int = 0  # the sampler's per-layer copy in the compute dtype (actor, while generating)
    activations: int = 0  # the largest of the role's compiled steps

    @property
    def resident(self) -> int:
        return self.params + self.optimizer

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.kv_cache + self.decode_weights + self.activations


@dataclasses.dataclass(frozen=True)
class Plan:
    devices: int
    mesh: dict[str, int]
    device_memory: int
    roles: list[RoleMemory]
    transients: dict[str, int]  # phase -> bytes on top of the resident state
    shapes: dict[str, int]

    @property
    def resident(self) -> int:
        return sum(r.resident for r in self.roles)

    @property
    def peak(self) -> int:
        return self.resident + max(self.transients.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_memory


# --- bytes of sharded trees ---------------------------------------------------------------------

def sharded_bytes(abstract, shardings) -> int:
    """sum over leaves of prod(shard shape) x itemsize."""
    sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize,
                         abstract, shardings)
    return int(sum(jax.tree.leaves(sizes)))


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs that carry their shardings (abstract inputs of a sharded compile)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def compiled_temp_bytes(partitioner: Partitioner, jitted, *args) -> int:
    """``temp_size_in_bytes`` of ``jitted`` compiled for ``args`` under the partitioner's mesh."""
    with partitioner.activate():
        return int(jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes)


# --- the run's models and shapes ----------------------------------------------------------------

def architecture(hf_path: str | None, preset_name: str | None, what: str, instead: str) -> LlamaConfig:
    """A model's LlamaConfig from a preset or a checkpoint's config.json (no weights read); without
    either, the error names ``instead``, how to give a preset."""
    if preset_name is not None:
        return preset(preset_name)
    if hf_path is None or not os.path.isfile(os.path.join(hf_path, "config.json")):
        raise ConfigError(f"{what}: no config.json at {hf_path!r}; plan with a preset instead ({instead})")
    return load_hf_config(hf_path)


def ppo_models(cfg: PPOConfig, reward_preset: str | None) -> dict[str, tuple[LlamaConfig, str]]:
    """role -> (architecture, kind), all with the run's numerics (``model``'s dtypes and remat;
    the frozen roles' weights in the compute dtype, ``frozen_config``). The actor and reference
    are ICE-Instruct; the critic has its backbone (the reward model's with
    ``critic_init: reward``); the reward model is a checkpoint's or ``reward_preset``."""
    policy = model_config(cfg.model, architecture(cfg.model.hf_path, cfg.model.preset, "model.hf_path",
                                                     "model.hf_path=null model.preset=NAME"))
    models = {"actor": (policy, "causal_lm"), "reference": (frozen_config(policy), "causal_lm")}
    reward = None
    if cfg.reward.path is not None or reward_preset is not None:
        reward = with_numerics(architecture(cfg.reward.path, reward_preset, "reward.path", "--reward-preset NAME"),
                               cfg.model)
        models["reward"] = (frozen_config(reward), "score")
    models["critic"] = (reward if cfg.ppo.critic_init == "reward" else policy, "score")
    return {role: models[role] for role in ("actor", "critic", "reference", "reward") if role in models}


def rollout_shapes(cfg: PPOConfig) -> dict[str, int]:
    """Worst-case shapes: prompts of ``max_prompt_length`` tokens, responses of
    ``max_new_tokens``; one response per prompt (rows = prompts per iteration), generated
    ``rollout.micro_batch_size`` at a time."""
    prompt_slots = bucket(cfg.data.max_prompt_length, PROMPT_BUCKETS)
    rows = cfg.data.prompts_per_iteration
    return {"rows": rows, "length": prompt_slots + cfg.rollout.max_new_tokens,
            "generation_rows": ppo.rows_at_a_time(cfg),
            "cache_slots": prompt_slots + bucket(cfg.rollout.max_new_tokens, NEW_TOKEN_BUCKETS),
            "minibatch_rows": rows // cfg.ppo.minibatches}


def rollout_batch(partitioner: Partitioner, rows: int, length: int) -> dict:
    """Abstract experience rows as the PPO updates read them (see ``ppo.make_train_step``)."""
    sharding = partitioner.batch_sharding
    tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=sharding)
    per_action = jax.ShapeDtypeStruct((rows, length - 1), jnp.float32, sharding=sharding)
    return {"tokens": tokens, "attention_mask": tokens,
            "mask": jax.ShapeDtypeStruct((rows, length - 1), jnp.int32, sharding=sharding),
            "old_logprobs": per_action, "advantages": per_action, "old_values": per_action,
            "returns": per_action}


# --- the plan -----------------------------------------------------------------------------------

FORWARDS = {"actor": rollout.sequence_logprobs, "reference": rollout.sequence_logprobs_without_entropy,
            "critic": rollout.critic_values, "reward": rollout.reward_model_scores}


def forward_temp_bytes(partitioner: Partitioner, role: str, llama: LlamaConfig, kind: str, cfg: PPOConfig,
                       shapes: dict[str, int]) -> int:
    """Compiled temporaries of the role's scoring forward over the rollout batch (in
    ``rollout.micro_batch_size`` pieces, as the trainer runs it)."""
    graphdef, params = abstract_model(llama, kind)
    params_in = with_shardings(params, partitioner.shardings(params))
    experience = rollout_batch(partitioner, shapes["rows"], shapes["length"])
    args = (params_in, experience["tokens"], experience["attention_mask"])
    forward = ppo.scoring_forward(FORWARDS[role], graphdef, cfg)
    if kind == "causal_lm":
        forward = jax.jit(forward, static_argnums=(3, 4))
        args += (cfg.rollout.temperature, cfg.rollout.max_new_tokens)
    else:
        forward = jax.jit(forward)
    return compiled_temp_bytes(partitioner, forward, *args)


def role_memory(partitioner: Partitioner, role: str, llama: LlamaConfig, kind: str, cfg: PPOConfig,
                shapes: dict[str, int], forward_temp: int) -> tuple[RoleMemory, int]:
    """(the role's bytes per device, the transient of its update step: gradients + activations)."""
    _, params = abstract_model(llama, kind)
    memory = {"params": sharded_bytes(params, partitioner.shardings(params))}
    update_transient = 0
    if role in ("actor", "critic"):
        make_update, opt_cfg = ((ppo_updates.make_actor_update, cfg.actor_optimizer) if role == "actor"
                                else (ppo_updates.make_critic_update, cfg.critic_optimizer))
        graphdef = abstract_model(llama, kind)[0]
        tx = make_optimizer(opt_cfg, PLAN_OPTIMIZER_STEPS)
        state = jax.eval_shape(lambda p: init_train_state(p, tx, 0), params)
        state_shardings = partitioner.shardings(state)
        memory["optimizer"] = sharded_bytes(state.opt_state, state_shardings.opt_state)
        memory["gradients"] = memory["params"]
        minibatch = rollout_batch(partitioner, shapes["minibatch_rows"], shapes["length"])
        update_transient = compiled_temp_bytes(partitioner, make_update(graphdef, tx, cfg),
                                               with_shardings(state, state_shardings), minibatch)
        memory["activations"] = max(forward_temp, update_transient - memory["gradients"])
    else:
        memory["activations"] = forward_temp
    if role == "actor":
        memory["kv_cache"] = kv_cache_bytes(partitioner, llama, shapes["generation_rows"], shapes["cache_slots"])
        memory["decode_weights"] = decode_weight_bytes(partitioner, params, llama)
    return RoleMemory(role=role, model=describe(llama), **memory), update_transient


def kv_cache_bytes(partitioner: Partitioner, llama: LlamaConfig, rows: int, slots: int) -> int:
    """The sampler's cache: per layer, k [rows, kv_heads, slots, D] and v [rows, kv_heads, D, slots],
    rows split like the batch, kv heads like ``kv_heads``."""
    cache = jax.eval_shape(lambda: init_cache(llama, rows, slots, per_layer=True))
    shardings = {name: jax.sharding.NamedSharding(partitioner.mesh, partitioner.spec(axes, "KV cache"))
                 for name, axes in LAYER_CACHE_AXES.items()}
    return sum(sharded_bytes(layer[name], shardings[name]) for layer in cache for name in layer)


def decode_weight_bytes(partitioner: Partitioner, params, llama: LlamaConfig) -> int:
    """``sampling._inference_weights``: the layer weights and the LM head kernel in the compute
    dtype, sharded like the parameters they are copied from."""
    head = "embed" if llama.tie_word_embeddings else "lm_head"
    copied = {name: params[name] for name in ("layers", head)}
    as_compute = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, llama.compute_dtype), copied)
    return sharded_bytes(as_compute, partitioner.shardings(copied))


def describe(llama: LlamaConfig) -> str:
    """e.g. "13.0B bf16 params / bf16 compute"."""
    n = llama.num_params()
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    return f"{size} {short[llama.param_dtype]} params / {short[llama.dtype]} compute"


def plan_ppo(cfg: PPOConfig, device_memory_gib: float, reward_preset: str | None = None,
             progress: bool = False) -> Plan:
    """The per-device memory plan of ``cfg`` on ``cfg.mesh`` over every visible device
    (``progress``: a bar over the roles, whose programs it compiles, on stderr)."""
    partitioner = Partitioner.from_config(cfg.mesh)
    shapes = rollout_shapes(cfg)
    ppo.check_rollout_batch(partitioner, cfg)
    roles, transients, forwards = [], {}, {}
    models = ppo_models(cfg, reward_preset)
    for role, (llama, kind) in tqdm(models.items(), total=len(models), desc="plan", unit="role", leave=False,
                                    disable=not progress):
        key = (FORWARDS[role], llama, kind)
        if key not in forwards:
            forwards[key] = forward_temp_bytes(partitioner, role, llama, kind, cfg, shapes)
        memory, update_transient = role_memory(partitioner, role, llama, kind, cfg, shapes, forwards[key])
        roles.append(memory)
        transients[f"score: {role}"] = forwards[key]
        if update_transient:
            transients[f"update: {role}"] = update_transient
    if ppo_updates.fuses_rollout_forwards(cfg):  # make_joint_update: both updates' transients live at once
        transients["update: actor + critic"] = transients["update: actor"] + transients["update: critic"]
    actor = roles[0]
    transients["generate"] = actor.kv_cache + actor.decode_weights + transients["score: actor"]
    return Plan(devices=partitioner.mesh.size, mesh=dict(partitioner.mesh.shape),
                device_memory=int(device_memory_gib * GIB), roles=roles, transients=transients, shapes=shapes)


def plan_to_dict(plan: Plan) -> dict:
    return {"devices": plan.devices, "mesh": plan.mesh, "device_memory": plan.device_memory,
            "shapes": plan.shapes, "roles": [dataclasses.asdict(r) | {"total": r.total} for r in plan.roles],
            "transients": plan.transients, "resident": plan.resident, "peak": plan.peak, "fits": plan.fits}


def format_plan(plan: Plan) -> str:
    """A markdown table in GiB per device, then the peak and the verdict."""
    def gib(n: int) -> str:
        return f"{n / GIB:.2f}"

    mesh = " x ".join(f"{name} {size}" for name, size in plan.mesh.items())
    lines = [(f"{plan.devices} devices, mesh {mesh}; rollout {plan.shapes['rows']} rows x "
              f"{plan.shapes['length']} tokens, update minibatch {plan.shapes['minibatch_rows']} rows"),
             "", "| role | model | params | optimizer | gradients | KV cache | decode copy | activations | total |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in plan.roles:
        lines.append(f"| {r.role} | {r.model} | {gib(r.params)} | {gib(r.optimizer)} | {gib(r.gradients)} | "
                     f"{gib(r.kv_cache)} | {gib(r.decode_weights)} | {gib(r.activations)} | {gib(r.total)} |")
    phase, largest = max(plan.transients.items(), key=lambda item: item[1])
    verdict = "fits" if plan.fits else "does NOT fit"
    lines += ["", (f"GiB per device. Resident (params + optimizer states): {gib(plan.resident)}; largest "
                   f"transient ({phase}): {gib(largest)}; peak {gib(plan.peak)} of {gib(plan.device_memory)} "
                   f"-> {verdict}.")]
    return "\n".join(lines)
