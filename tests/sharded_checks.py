"""Sharded-vs-single-device checks on 8 forced CPU devices; prints one JSON object.

Run by ``tests/test_sharding.py`` in a subprocess (the device count is fixed when jax starts):
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_checks.py OUT_DIR TOKENIZER_DIR``.
Each check reports measured differences; the test module holds the tolerances (shared setup:
``sharded_setup``; the checks that rows stay on their devices: ``sharded_rows``). XLA's backend
optimisation is turned down: compiling is 7x faster and the checks are about values, not speed.
"""

import dataclasses
import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# On a loaded 2-core machine (CI runs four test workers) one of the 8 device threads can reach a
# collective more than XLA:CPU's default 40 s after the others, which aborts the process (seen
# once in CI). A real deadlock still ends, with XLA's message, before the test's 600 s timeout.
PATIENT_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=300"
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8 "
                           f"{FAST_COMPILE} {PATIENT_COLLECTIVES}")
os.environ["JAX_PLATFORMS"] = "cpu"

import collections
import contextlib
import io
import json
import logging
import re
import sys

import jax
import numpy as np
from flax import nnx
from sharded_rows import (
    check_chunked_logprobs_gathers,
    check_chunked_scoring,
    micro_batch_row_moves,
)
from sharded_setup import (
    ACCUM,
    BATCH,
    LENGTH,
    MESHES,
    MODEL,
    MODEL_MESHES,
    OPTIMIZER,
    PPO,
    SCORER,
    STEPS,
    max_difference,
    max_relative,
    norm_of_difference,
    partitioner,
)

from icegrt_jax import cli
from icegrt_jax.checkpoint import (
    TrainCheckpointer,
    load_model,
    load_model_dir,
    save_model,
)
from icegrt_jax.config import (
    MeshConfig,
    PPOConfig,
    SFTConfig,
)
from icegrt_jax.config_loader import load_config
from icegrt_jax.hf import load_hf, save_hf
from icegrt_jax.models.heads import ScoreModel
from icegrt_jax.models.llama import Llama, LlamaConfig, preset
from icegrt_jax.sampling import SamplingParams, _inference_weights, _prefill, generate
from icegrt_jax.sharding import Partitioner, ShardingError
from icegrt_jax.train import ppo, ppo_updates, reward, sft
from icegrt_jax.train.model_init import init_model, model_config, place_frozen
from icegrt_jax.train.state import (
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
)


def sft_batches(seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        ids = rng.integers(3, MODEL.vocab_size, (BATCH, LENGTH)).astype(np.int32)
        lengths = rng.integers(LENGTH // 2, LENGTH + 1, BATCH)
        mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
        loss_mask = mask * (np.arange(LENGTH)[None] >= 4)
        yield {"input_ids": ids, "attention_mask": mask, "targets": np.roll(ids, -1, axis=1),
               "loss_mask": loss_mask.astype(np.int32)}


def reward_batches(seed=1):
    """(chosen, rejected) pairs [BATCH, 2, LENGTH], right-padded, every pair counted."""
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        ids = rng.integers(3, MODEL.vocab_size, (BATCH, 2, LENGTH)).astype(np.int32)
        lengths = rng.integers(LENGTH // 2, LENGTH + 1, (BATCH, 2, 1))
        mask = (np.arange(LENGTH) < lengths).astype(np.int32)
        yield {"input_ids": ids, "attention_mask": mask, "weight": np.ones(BATCH, np.float32)}


def ppo_minibatches(seed=2):
    """Experience rows as ``ppo.make_train_step`` feeds the updates: prompt then response; old
    log-probs near the model's (log 1/V), so some ratios are clipped and some are not."""
    rng = np.random.default_rng(seed)
    positions = np.arange(LENGTH)[None]

    def per_action(loc, scale):
        return rng.normal(loc, scale, (BATCH, LENGTH - 1)).astype(np.float32)

    for _ in range(STEPS):
        starts = rng.integers(4, 10, (BATCH, 1))
        ends = rng.integers(LENGTH // 2, LENGTH + 1, (BATCH, 1))
        yield {"tokens": rng.integers(3, MODEL.vocab_size, (BATCH, LENGTH)).astype(np.int32),
               "attention_mask": (positions < ends).astype(np.int32),
               "mask": ((positions >= starts) & (positions < ends))[:, 1:].astype(np.int32),
               "old_logprobs": per_action(-np.log(MODEL.vocab_size), 0.2), "advantages": per_action(0.0, 1.0),
               "old_values": per_action(0.0, 0.5), "returns": per_action(0.0, 1.0)}


def run_steps(model_fn, make_step, batches, shape=None):
    """Metrics and final state of STEPS steps of ``make_step(graphdef, tx, **sharding)`` on a fresh
    ``model_fn()``; single device (plain jit) when shape is None."""
    graphdef, params = nnx.split(model_fn())
    tx = make_optimizer(OPTIMIZER, STEPS)
    if shape is None:
        state, put_batch = init_train_state(params, tx, 0), lambda b: b
        step = make_step(graphdef, tx)
    else:
        p = partitioner(shape)
        state = p.init_state(lambda q: init_train_state(q, tx, 0), params)
        step = make_step(graphdef, tx, partitioner=p, state_shardings=p.shardings(state))
        put_batch = p.shard_batch
    curves = collections.defaultdict(list)
    for batch in batches:
        state, metrics = step(state, put_batch(batch))
        for name, value in metrics.items():
            curves[name].append(float(value))
    return curves, state


def run_sft_steps(cfg: LlamaConfig, shape=None):
    """Losses and final state of STEPS SFT steps; single device (plain jit) when shape is None."""
    schedule = learning_rate_schedule(OPTIMIZER, STEPS)
    return run_steps(lambda: Llama(cfg, nnx.Rngs(0)),
                     lambda g, tx, **kw: sft.make_train_step(g, tx, schedule, ACCUM, **kw), sft_batches(), shape)


def compare_steps(run, curve_names, initial_params=None, meshes=tuple(MESHES)) -> tuple[dict, dict]:
    """``run(shape)`` on each of ``meshes`` against ``run(None)``: relative differences of the named
    metric curves, max differences of the parameters (absolute) and Adam's moments (relative to
    each leaf's largest entry); with ``initial_params``, the norm of the parameter difference
    relative to the norm of the reference's update (``update_rel``) and the norm of the moments'
    difference relative to their norm (``moments_rel``). Also returns each mesh's state."""
    reference_curves, reference = run(None)
    results, states = {}, {}
    for name in meshes:
        curves, state = run(MESHES[name])
        states[name] = state
        results[name] = {f"{curve}_rel": max_relative(curves[curve], reference_curves[curve]) for curve in curve_names}
        results[name].update(params_abs=max_difference(state.params, reference.params),
                             adam_moments_rel=max_difference(state.opt_state, reference.opt_state, relative=True))
        if initial_params is not None:
            zeros = jax.tree.map(np.zeros_like, reference.opt_state)
            results[name].update(
                update_rel=(norm_of_difference(state.params, reference.params)
                            / norm_of_difference(reference.params, initial_params)),
                moments_rel=(norm_of_difference(state.opt_state, reference.opt_state)
                             / norm_of_difference(reference.opt_state, zeros)))
    return results, states


def compare_model_steps(model_fn, make_step, batches_fn, curve_names) -> dict:
    """``compare_steps`` of ``make_step`` on ``model_fn()``, over ``batches_fn()``, on the meshes
    that shard the model (the pure data-parallel 8x1x1 splits batches as SFT's check does)."""
    initial = nnx.split(model_fn())[1]
    results, _ = compare_steps(lambda shape: run_steps(model_fn, make_step, batches_fn(), shape), curve_names,
                               initial, MODEL_MESHES)
    return results


def check_reward_steps() -> dict:
    """Bradley-Terry reward steps (margin 0) on a ScoreModel."""
    def make_step(graphdef, tx, **sharding):
        return reward.make_train_step(graphdef, tx, learning_rate_schedule(OPTIMIZER, STEPS), ACCUM, "bradley_terry",
                                      0.0, **sharding)

    return compare_model_steps(lambda: ScoreModel(MODEL, nnx.Rngs(1)), make_step, reward_batches,
                               ("loss", "grad_norm", "score_std"))


def check_ppo_updates() -> dict:
    """PPO actor updates (clipped surrogate) on a Llama and critic updates (clipped value loss)
    on a ScoreModel, over the same experience minibatches."""
    return {
        "actor": compare_model_steps(lambda: Llama(MODEL, nnx.Rngs(2)),
                                     lambda g, tx, **kw: ppo_updates.make_actor_update(g, tx, PPO, **kw), ppo_minibatches,
                                     ("policy_loss", "actor_grad_norm", "approx_kl")),
        "critic": compare_model_steps(lambda: ScoreModel(MODEL, nnx.Rngs(3)),
                                      lambda g, tx, **kw: ppo_updates.make_critic_update(g, tx, PPO, **kw), ppo_minibatches,
                                      ("value_loss", "critic_grad_norm")),
    }


def check_sft_steps() -> tuple[dict, dict]:
    """Differences from one device per mesh, and the final state of each mesh."""
    initial = nnx.split(Llama(MODEL, nnx.Rngs(0)))[1]  # run_sft_steps' model
    results, states = compare_steps(lambda shape: run_sft_steps(MODEL, shape), ("loss", "grad_norm"), initial)
    for name, state in states.items():
        wq = state.params["layers"]["wq"].get_value()
        results[name].update(wq_spec=str(wq.sharding.spec), wq_shard_shape=list(wq.addressable_shards[0].data.shape))
    bf16 = MODEL.replace(dtype="bfloat16")
    bf16_reference, _ = run_sft_steps(bf16)
    bf16_curves, _ = run_sft_steps(bf16, MESHES["2x2x2"])
    results["bf16_2x2x2_loss_rel"] = max_relative(bf16_curves["loss"], bf16_reference["loss"])
    return results, states


def check_resharding_restore(state, directory: str) -> dict:
    """Save ``state`` (laid out on (2,2,2)); restore onto (8,1,1) and onto one device."""
    checkpointer = TrainCheckpointer(directory)
    checkpointer.save(1, state, {"note": "2x2x2"}, force=True)
    checkpointer.wait()
    saved = jax.device_get(state)
    results = {}
    for name, p in {"8x1x1": partitioner((8, 1, 1)),
                    "one_device": Partitioner.from_config(MeshConfig(data=1), jax.devices()[:1])}.items():
        target = p.shardings(state)
        restored, meta = checkpointer.restore(state, shardings=target)
        same_values = all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                                       jax.device_get(restored), saved)))
        same_layout = all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, restored, target)))
        devices = {d.id for leaf in jax.tree.leaves(restored) for d in leaf.sharding.device_set}
        results[name] = {"equal": same_values, "layout": same_layout, "devices": len(devices),
                         "meta": meta}
    checkpointer.close()
    return results


def check_tensor_parallel_sampling() -> dict:
    cfg = MODEL.replace(num_heads=8, num_kv_heads=4, intermediate_size=128)
    graphdef, params = nnx.split(Llama(cfg, nnx.Rngs(3)))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 9, 3, 12)]
    options = SamplingParams(greedy=True, max_new_tokens=12, eos_token_ids=())
    single = generate((graphdef, params), prompts, options)
    repeated = dataclasses.replace(options, num_samples=3)  # the prefill repeats each prompt's cache
    single_repeated = generate((graphdef, params), prompts, repeated)
    results = {}
    for name, shape in {"2x1x4": (2, 1, 4)}.items():
        p = partitioner(shape)
        sharded_params = p.put(params)
        with p.activate():
            sharded = generate((graphdef, sharded_params), prompts, options)
            sharded_repeated = generate((graphdef, sharded_params), prompts, repeated)
            weights = _inference_weights(graphdef, sharded_params)
            _, cache = _prefill(graphdef, sharded_params, weights, np.ones((4, 16), np.int32),
                                np.ones((4, 16), np.int32), new_slots=16, num_samples=1)
        results[name] = {"same_tokens": bool(np.array_equal(sharded.tokens, single.tokens)),
                         "same_repeated_tokens": bool(np.array_equal(sharded_repeated.tokens, single_repeated.tokens)
                                                      and np.array_equal(single_repeated.tokens[::3], single.tokens)),
                         "cache_spec": str(cache[0]["k"].sharding.spec),
                         "logprobs_abs": float(np.max(np.abs(sharded.logprobs - single.logprobs))),
                         "wq_spec": str(sharded_params["layers"]["wq"].get_value().sharding.spec),
                         "wq_shard": list(sharded_params["layers"]["wq"].get_value().addressable_shards[0].data.shape),
                         "copy_wqkv_shard": list(weights["layers"][0]["wqkv"].addressable_shards[0].data.shape),
                         "copy_gate_up_shard": list(weights["layers"][0]["w_gate_up"].addressable_shards[0].data.shape)}
    return results


@contextlib.contextmanager
def global_arrays_stay_on_devices():
    """Within: ``jax.device_get`` of an array spread over several devices raises (in a
    multi-process run such an array cannot be fetched to one host)."""
    real = jax.device_get

    def device_get(x):
        if any(isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1 for leaf in jax.tree.leaves(x)):
            raise AssertionError("a global array was fetched to the host")
        return real(x)

    jax.device_get = device_get
    try:
        yield
    finally:
        jax.device_get = real


def check_placed_loading(directory: str) -> dict:
    """Models loaded onto (2,2,2) with a partitioner, against the plain single-device load: an
    HF directory, a project checkpoint, a random preset; frozen copies cast where they lie."""
    _, params = nnx.split(Llama(MODEL, nnx.Rngs(5)))
    save_hf(MODEL, params, os.path.join(directory, "load-hf"))
    save_model(MODEL, params, os.path.join(directory, "load-project"))
    p = partitioner((2, 2, 2))

    def compare(placed, reference) -> dict:
        target = jax.tree.leaves(p.shardings(placed))
        return {"layout": all(a.sharding == t for a, t in zip(jax.tree.leaves(placed), target, strict=True)),
                "max_abs": max_difference(placed, reference)}

    host = load_hf(os.path.join(directory, "load-hf"), on_host=True)[1]
    results = {"host_leaf_types": sorted({type(x).__name__ for x in jax.tree.leaves(host)})}
    for name in ("load-hf", "load-project"):
        single = load_model_dir(os.path.join(directory, name))[1]
        with global_arrays_stay_on_devices():
            placed = load_model_dir(os.path.join(directory, name), partitioner=p)[1]
            half = place_frozen(p, placed, MODEL.replace(dtype="bfloat16"))
            unchanged = place_frozen(p, placed, MODEL)
        results[name] = {**compare(placed, single), "frozen_layout": compare(half, single)["layout"],
                         "frozen_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(half)}),
                         "frozen_max_abs": max_difference(half, jax.tree.map(lambda x: x.astype("bfloat16"), single)),
                         "unchanged_shared": all(a is b for a, b in zip(jax.tree.leaves(unchanged),
                                                                        jax.tree.leaves(placed), strict=True))}
    model = dataclasses.replace(SFTConfig().model, preset="tiny")
    eager = nnx.split(Llama(model_config(model, preset("tiny")), nnx.Rngs(7)))[1]
    results["random"] = compare(init_model(model, 7, p)[1], eager)
    reversed_mesh = Partitioner(jax.sharding.Mesh(p.mesh.devices[::-1], p.mesh.axis_names), p.rules)
    placed = load_model_dir(os.path.join(directory, "load-project"), partitioner=p)[1]
    with global_arrays_stay_on_devices():  # the same devices in another order
        moved = reversed_mesh.put(placed, float_dtype="bfloat16")
    results["reversed_mesh"] = {
        "layout": all(a.sharding == t for a, t in zip(jax.tree.leaves(moved), jax.tree.leaves(
            reversed_mesh.shardings(moved)), strict=True)),
        "max_abs": max_difference(moved, jax.tree.map(lambda x: x.astype("bfloat16"), placed))}
    return results


def error_before_compiling(fn) -> dict:
    """Run ``fn`` from empty in-memory compile caches (a cached program compiles without an
    event); report its error message and how many compile events fired first."""
    compiles = []

    def listener(event, *_, **__):
        if "compil" in event:
            compiles.append(event)

    jax.clear_caches()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
        return {"error": None, "compiles": len(compiles)}
    except ShardingError as e:
        return {"error": str(e), "compiles": len(compiles)}
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


DOUBLE = jax.jit(lambda x: 2 * x)


def double_on_mesh():
    """A tiny program on the (2,2,2) mesh."""
    return DOUBLE(jax.device_put(np.ones((8, 4), np.float32), partitioner(MESHES["2x2x2"]).batch_sharding))


def compile_then_fail():
    """``error_before_compiling``'s control: the error after a compile."""
    double_on_mesh()
    raise ShardingError("after compiling")


def write_config(directory: str, name: str, config: dict) -> str:
    path = os.path.join(directory, f"{name}.yaml")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def check_bad_input(directory: str) -> dict:
    run_dir = os.path.join(directory, "bad-run")

    def bad_sft(*overrides):
        path = write_config(directory, "bad-sft", {
            "model": {"preset": "tiny"}, "training": {"output_dir": run_dir},
            "data": {"train_files": ["missing.jsonl"], "tokenizer_path": "x", "batch_size": 8}})
        return lambda: sft.run_sft(load_config(SFTConfig, path, list(overrides)))

    def bad_ppo(*overrides):
        path = write_config(directory, "bad-ppo", {
            "model": {"preset": "tiny"}, "training": {"output_dir": run_dir}, "reward": {"function": SCORER},
            "data": {"prompt_files": ["missing.jsonl"], "tokenizer_path": "x", "prompts_per_iteration": 16}})
        return lambda: ppo.run_ppo(load_config(PPOConfig, path, list(overrides)))

    results = {
        "mesh_not_dividing": error_before_compiling(bad_sft("mesh.data=3")),
        "unknown_logical_axis": error_before_compiling(bad_sft("mesh.rules=[[batch,data],[mpl,tensor]]")),
        "batch_not_divisible": error_before_compiling(bad_sft("mesh.data=8", "data.batch_size=12")),
        "micro_batch_not_divisible": error_before_compiling(
            bad_sft("mesh.data=8", "data.batch_size=8", "optimizer.grad_accum_steps=2")),
        "ppo_minibatch_not_divisible": error_before_compiling(bad_ppo("mesh.data=8", "ppo.minibatches=4")),
        "ppo_micro_batch_not_divisible": error_before_compiling(
            bad_ppo("mesh.data=4", "ppo.minibatches=2", "critic_optimizer.grad_accum_steps=4")),
        "rollout_micro_batch_not_divisible": error_before_compiling(
            bad_ppo("mesh.data=8", "rollout.micro_batch_size=4")),
    }
    results["run_dir_created"] = os.path.exists(run_dir)
    no_mlp_rule = MeshConfig(data=8, rules=[r for r in MeshConfig().rules if r[0] != "mlp"])
    _, abstract = nnx.split(nnx.eval_shape(lambda: Llama(MODEL, nnx.Rngs(0))))
    results["missing_rule"] = error_before_compiling(lambda: Partitioner.from_config(no_mlp_rule).shardings(abstract))
    double_on_mesh()  # cached: the control counts its compile only from empty caches
    results["control_compile_then_fail"] = error_before_compiling(compile_then_fail)
    return results


@contextlib.contextmanager
def compile_counts():
    """{function name: number of compilations} of the ``jax.jit`` programs compiled inside."""
    counts = collections.Counter()
    handler = logging.Handler()
    handler.emit = lambda record: counts.update(re.findall(r"^Compiling jit\((\w+)\)", record.getMessage()))
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with jax.log_compiles(True):
            yield counts
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


PPO_PROGRAMS = ("_prefill", "_decode", "sequence_logprobs", "sequence_logprobs_without_entropy", "critic_values",
                "experience_from_scores", "take_rows", "update")


def check_ppo_run(directory: str, tokenizer_dir: str) -> dict:
    """Two iterations of ``icegrt ppo`` on (2,2,2): sampling, scoring and both updates sharded;
    how often each of its programs compiled."""
    with open(os.path.join(directory, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": f"Write {i} words about the sea."}) + "\n" for i in range(16))
    optimizer = {"lr": 1e-3, "schedule": "constant", "grad_accum_steps": 2}
    path = write_config(directory, "ppo", {
        "model": {"preset": "tiny", "vocab_size": 400}, "actor_optimizer": optimizer, "critic_optimizer": optimizer,
        "data": {"prompt_files": [os.path.join(directory, "prompts.jsonl")], "tokenizer_path": tokenizer_dir,
                 "prompts_per_iteration": 16},
        "rollout": {"max_new_tokens": 8}, "reward": {"function": SCORER}, "ppo": {"minibatches": 2},
        "training": {"steps": 2, "log_every": 1, "output_dir": os.path.join(directory, "ppo-run")},
        "logging": {"progress": False}, "mesh": {"data": 2, "fsdp": 2, "tensor": 2}})
    with compile_counts() as counts, contextlib.redirect_stdout(io.StringIO()):
        ppo.run_ppo(load_config(PPOConfig, path))
    with open(os.path.join(directory, "ppo-run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"iterations": [r["step"] for r in rows],
            "finite": all(np.isfinite(v) for r in rows for v in r.values()),
            "compiles": {name: counts[name] for name in PPO_PROGRAMS},
            "final_saved": os.path.isdir(os.path.join(directory, "ppo-run", "final"))}


def check_fused_critic_run(directory: str, tokenizer_dir: str) -> dict:
    """Two iterations with one epoch, one minibatch, no accumulation on (2,2,2) and on one device:
    the first a critic warm-up (the critic's step gives the values:
    ``make_critic_update_with_values``), the second the joint actor + critic program
    (``make_joint_update``): their metrics, and the largest difference of the final actor and
    critic parameters between the meshes next to the largest change of the actor's. AdamW with
    eps 1 (>> |g|) steps like SGD, lr x g / eps, so parameters differ by lr x the gradients'
    difference instead of Adam's first-step lr x sign(g)."""
    runs, params = {}, {}
    optimizer = {"lr": 0.1, "eps": 1.0, "schedule": "constant"}
    for name, mesh in (("2x2x2", {"data": 2, "fsdp": 2, "tensor": 2}), ("one_device", {"data": 1})):
        path = write_config(directory, f"ppo-fused-{name}", {
            "model": {"preset": "tiny", "vocab_size": 400}, "actor_optimizer": optimizer, "critic_optimizer": optimizer,
            "data": {"prompt_files": [os.path.join(directory, "prompts.jsonl")], "tokenizer_path": tokenizer_dir,
                     "prompts_per_iteration": 16},
            "rollout": {"max_new_tokens": 8}, "reward": {"function": SCORER}, "ppo": {"critic_warmup_iterations": 1},
            "training": {"steps": 2, "log_every": 1, "output_dir": os.path.join(directory, f"fused-{name}")},
            "logging": {"progress": False}, "mesh": mesh})
        with contextlib.redirect_stdout(io.StringIO()):
            ppo.run_ppo(load_config(PPOConfig, path))
        with open(os.path.join(directory, f"fused-{name}", "metrics.jsonl")) as f:
            runs[name] = [json.loads(line) for line in f]
        params[name] = [jax.tree.leaves(load_model(os.path.join(directory, f"fused-{name}", role))[1])
                        for role in ("final", "final-critic")]
    largest = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))
    cfg = load_config(PPOConfig, path)
    initial = jax.tree.leaves(init_model(cfg.model, cfg.training.seed, Partitioner.from_config(cfg.mesh))[1])
    runs["params_difference"] = max(largest(a, b) for a, b in zip(*params.values(), strict=True))
    runs["actor_change"] = largest(params["one_device"][0], initial)
    return runs


PLAN_CONFIG = {
    "model": {"preset": "tiny", "dtype": "bfloat16", "param_dtype": "bfloat16", "remat": "full"},
    "actor_optimizer": {"grad_accum_steps": 2}, "critic_optimizer": {"grad_accum_steps": 2},
    "data": {"prompt_files": ["p.jsonl"], "tokenizer_path": "tok", "max_prompt_length": 30,
             "prompts_per_iteration": 16},
    "rollout": {"max_new_tokens": 20}, "reward": {"path": "no-such-reward-model"}, "ppo": {"minibatches": 2},
    "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
}


def check_plan(directory: str) -> dict:
    """``icegrt plan`` of a tiny PPO run on (2,2,2), and its error on a batch the mesh cannot split."""
    path = os.path.join(directory, "plan.yaml")
    with open(path, "w") as f:
        json.dump(PLAN_CONFIG, f)
    args = ["plan", "--config", path, "--devices", "8", "--device-memory", "1", "--reward-preset", "tiny"]
    stdout, progress, stderr = io.StringIO(), io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(progress):
        code = cli.main([*args, "--json"])
    with contextlib.redirect_stderr(stderr):
        bad_code = cli.main([*args, "data.prompts_per_iteration=12"])
    micro = io.StringIO()
    with contextlib.redirect_stdout(micro), contextlib.redirect_stderr(io.StringIO()):
        cli.main([*args, "--json", "rollout.micro_batch_size=4"])
    return {"code": code, "plan": json.loads(stdout.getvalue()), "progress": progress.getvalue(), "bad_code": bad_code,
            "bad_error": stderr.getvalue(), "micro_plan": json.loads(micro.getvalue())}


def main(directory: str, tokenizer_dir: str):
    sft_results, states = check_sft_steps()
    results = {
        "devices": jax.device_count(),
        "bad_input": check_bad_input(directory),
        "sft": sft_results,
        "reward": check_reward_steps(),
        "ppo_updates": check_ppo_updates(),
        "ppo_run": check_ppo_run(directory, tokenizer_dir),
        "fused_critic_run": check_fused_critic_run(directory, tokenizer_dir),
        "restore": check_resharding_restore(states["2x2x2"], os.path.join(directory, "checkpoints")),
        "sampling": check_tensor_parallel_sampling(),
        "plan": check_plan(directory),
        "placed_loading": check_placed_loading(directory),
        "chunked_scoring": check_chunked_scoring(),
        "chunked_logprobs_gathers": check_chunked_logprobs_gathers(),
        "micro_batch_row_moves": micro_batch_row_moves(),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
