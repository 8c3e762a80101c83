"""Meshes, logical-axis rules, sharded SFT / reward / PPO steps, a sharded PPO run, resharding
restore, tensor-parallel sampling.

The sharded checks need 8 devices, which must be forced before jax starts, so they run once in a
subprocess (``sharded_checks.py``) that reports measured differences; the tolerances live here:

- fp32 SFT steps (2 AdamW steps, grad accumulation 2, lr 1e-3) on meshes (8,1,1), (2,4,1),
  (2,2,2) against one device: loss and gradient norm within 1e-5 relative and Adam's moments
  (linear in the gradients) within 1e-4 of each leaf's largest entry — only the order of
  floating-point sums differs (~1e-7 measured). Parameters: Adam divides each coordinate by its
  own RMS, so rounding noise on a near-zero gradient can move that coordinate by up to ~lr: each
  within lr = 1e-3 absolute (measured 1.9e-5 to 1.0e-4, the most on (2,2,2) on an Intel AVX-512
  VM), and as a norm, as for the reward and PPO steps below, within 1e-2 of the update's.
- bf16 compute on (2,2,2): loss within 2e-3 relative (bf16's 8-bit mantissa; measured 1.4e-4).
- fp32 reward steps (Bradley-Terry) and PPO actor and critic updates (2 AdamW steps each, grad
  accumulation 2, lr 1e-3, the same experience minibatches) on (2,4,1) and (2,2,2), which shard
  the models (the data-parallel (8,1,1) splits batches as in SFT's check), against one device:
  loss, gradient norm and the trainer's own metrics (score std; approx. KL) within 1e-4 relative.
  Step 1 differs only in summation order (~1e-7); step 2 starts from parameters that Adam's
  per-coordinate normalisation has already moved apart on a few near-zero-gradient coordinates
  (one coordinate in 10^4 by up to 6e-5, ~5% of lr), which moves the step-2 metrics by up to
  ~3e-6. So the parameters are compared as norms: |theta - theta_1dev| / |theta_1dev - theta_0|
  within 1e-2 (measured <= 1.2e-4) and |moments - moments_1dev| / |moments_1dev| within 1e-3
  (measured <= 1e-5); entry-wise, as SFT's, each parameter within lr = 1e-3 absolute (measured
  <= 6.9e-5) and Adam's moments within 1e-3 of each leaf's largest entry (measured <= 9.5e-5).
  A sharding mistake (a shard's rows lost or counted twice, a wrong reduction) shows up at the
  1e-1 level in the metrics and moments, and as lr-sized steps in the opposite direction on the
  parameters whose gradients it flips.
- A two-iteration PPO run on (2,2,2) (sampling, scoring, both updates sharded): each program
  (prefill, decode, log-probs, values, experience, minibatch selection) compiles once, the actor
  and critic updates once each.
- Greedy sampling with tensor parallelism: identical tokens, log-probs within 1e-5.
- Restore of a (2,2,2) checkpoint onto (8,1,1) and onto one device: bitwise equal.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from icegrt_jax.config import MeshConfig
from icegrt_jax.models.llama import Llama, preset
from icegrt_jax.sharding import (
    Partitioner,
    ShardingError,
    activation_spec,
    initialize_distributed,
    logical_rules,
    logical_to_spec,
    mesh_shape,
    wants_distributed,
)

CHECKS = os.path.join(os.path.dirname(__file__), "sharded_checks.py")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_tokenizer_dir) -> dict:
    out = subprocess.run([sys.executable, CHECKS, str(tmp_path_factory.mktemp("sharded")), tiny_tokenizer_dir],
                         check=False, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "0"})  # XLA's warnings shown
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results["devices"] == 8
    results["involuntary_rematerializations"] = out.stderr.count("Involuntary full rematerialization")
    return results


def test_no_step_makes_xla_replicate_a_sharded_tensor(sharded):
    """XLA's SPMD partitioner warns when a layout change can only be done by replicating a tensor
    (e.g. the embedding lookup on (2,2,2) before the table was gathered over its fsdp shards)."""
    assert sharded["involuntary_rematerializations"] == 0


# --- sharded runs (8 forced CPU devices) ---------------------------------------------------------

@pytest.mark.parametrize("mesh", ["8x1x1", "2x4x1", "2x2x2"])
def test_sharded_sft_step_matches_one_device(sharded, mesh):
    result = sharded["sft"][mesh]
    assert result["loss_rel"] < 1e-5
    assert result["grad_norm_rel"] < 1e-5
    assert result["adam_moments_rel"] < 1e-4
    assert result["params_abs"] < 1e-3
    assert result["update_rel"] < 1e-2
    assert result["moments_rel"] < 1e-3
    _, fsdp, tensor = map(int, mesh.split("x"))
    assert result["wq_spec"] == "P(None, 'fsdp', 'tensor', None)"  # [layers, embed, heads, head_dim]
    assert result["wq_shard_shape"] == [2, 64 // fsdp, 4 // tensor, 16]


def test_bf16_sharded_sft_step(sharded):
    assert sharded["sft"]["bf16_2x2x2_loss_rel"] < 2e-3


def assert_steps_match(result: dict, curves: tuple[str, ...]):
    for curve in curves:
        assert result[f"{curve}_rel"] < 1e-4, curve
    assert result["update_rel"] < 1e-2
    assert result["moments_rel"] < 1e-3
    # Largest entry-wise differences, measured (reward / PPO actor / critic): Adam's moments
    # 2.1e-5 / 9.5e-5 / 9e-6 of each leaf's largest entry, parameters 3.3e-5 / 6.9e-5 / 1.9e-5
    # absolute. A shard lost or counted twice moves a moment by O(1) of its leaf's largest, and
    # flips the sign of Adam's first step (lr = 1e-3 a coordinate) wherever it flips a gradient's.
    assert result["adam_moments_rel"] < 1e-3
    assert result["params_abs"] < 1e-3


@pytest.mark.parametrize("mesh", ["2x4x1", "2x2x2"])
def test_sharded_reward_step_matches_one_device(sharded, mesh):
    assert_steps_match(sharded["reward"][mesh], ("loss", "grad_norm", "score_std"))


@pytest.mark.parametrize("mesh", ["2x4x1", "2x2x2"])
@pytest.mark.parametrize("role, curves", [("actor", ("policy_loss", "actor_grad_norm", "approx_kl")),
                                          ("critic", ("value_loss", "critic_grad_norm"))])
def test_sharded_ppo_update_matches_one_device(sharded, mesh, role, curves):
    assert_steps_match(sharded["ppo_updates"][role][mesh], curves)


def test_sharded_ppo_run_compiles_each_program_once(sharded):
    result = sharded["ppo_run"]
    assert result["iterations"] == [1, 2] and result["finite"] and result["final_saved"]
    assert result["compiles"] == {"_prefill": 1, "_decode": 1, "sequence_logprobs": 1,  # old log-probs
                                  "sequence_logprobs_without_entropy": 1,  # the reference's
                                  "critic_values": 1, "experience_from_scores": 1, "take_rows": 1,
                                  "update": 2}  # actor, critic


def test_sharded_fused_update_programs_match_one_device(sharded):
    """The fused programs' shardings on (2,2,2): the critic's step with the values (a warm-up
    iteration), then the joint actor + critic step. Same rollouts (the sampler's draws agree
    here), so each iteration's metrics and the final parameters agree with one device to sharded
    reduction order (parameters: an SGD-like step, see ``check_fused_critic_run``)."""
    runs = sharded["fused_critic_run"]
    changes = {key: runs[key] for key in ("params_difference", "actor_change")}
    assert changes["params_difference"] < 1e-6 and changes["actor_change"] > 1e-3, changes  # equal steps taken
    assert len(runs["2x2x2"]) == len(runs["one_device"]) == 2
    assert "policy_loss" not in runs["one_device"][0] and "policy_loss" in runs["one_device"][1]
    critic = ["value_loss", "critic_grad_norm", "advantage_mean", "return_mean", "explained_variance", "kl"]
    expected = [critic, critic + ["policy_loss", "actor_grad_norm", "rollout_entropy"]]  # warm-up, then joint
    for keys, sharded_metrics, one_device in zip(expected, runs["2x2x2"], runs["one_device"], strict=True):
        for key in keys:
            np.testing.assert_allclose(sharded_metrics[key], one_device[key], rtol=1e-3, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("target", ["8x1x1", "one_device"])
def test_checkpoint_from_2x2x2_restores_on_another_mesh(sharded, target):
    result = sharded["restore"][target]
    assert result["equal"] and result["layout"]
    assert result["devices"] == (8 if target == "8x1x1" else 1)
    assert result["meta"] == {"note": "2x2x2"}


@pytest.mark.parametrize("mesh", ["2x1x4"])
def test_tensor_parallel_greedy_sampling_matches_one_device(sharded, mesh):
    result = sharded["sampling"][mesh]
    assert result["same_tokens"]
    assert result["same_repeated_tokens"]  # three samples a prompt: the repeated, donated cache, sharded
    assert result["logprobs_abs"] < 1e-5
    assert "tensor" in result["wq_spec"]
    # The sampler's per-layer copy is split alike: wqkv [H, K, G + 2, D] by kv heads (model: 8 heads,
    # 4 kv heads, D 8; tensor 4), w_gate_up [H, I, 2] by the MLP axis (I 128).
    assert result["copy_wqkv_shard"] == [result["wq_shard"][1], 1, 4, result["wq_shard"][3]]
    assert result["copy_gate_up_shard"] == [64, 128 // 4, 2]
    # A layer's k cache [batch, kv_heads, slots, head_dim]: rows over data, kv heads over tensor.
    assert result["cache_spec"] == "P('data', 'tensor')"


@pytest.mark.parametrize("source", ["load-hf", "load-project"])
def test_a_checkpoint_loads_straight_into_its_shards(sharded, source):
    """Loaded with a partitioner on (2,2,2): the same values as the single-device load, each array
    laid out by the partitioner's shardings, with no global array fetched to the host (an HF
    checkpoint is read into host memory, a project checkpoint restored into the shardings); a
    frozen role's bf16 copy is cast where the arrays lie, an unchanged one shares them."""
    result = sharded["placed_loading"][source]
    assert result["layout"] and result["max_abs"] == 0.0
    assert result["frozen_layout"] and result["frozen_dtypes"] == ["bfloat16"] and result["frozen_max_abs"] == 0.0
    assert result["unchanged_shared"]
    assert sharded["placed_loading"]["host_leaf_types"] == ["ndarray"]  # load_hf(on_host=True)


def test_put_moves_placed_arrays_onto_a_mesh_of_the_same_devices_in_another_order(sharded):
    result = sharded["placed_loading"]["reversed_mesh"]
    assert result["layout"] and result["max_abs"] == 0.0


def test_a_random_model_is_initialised_into_its_shards(sharded):
    result = sharded["placed_loading"]["random"]
    assert result["layout"]
    # The jitted initialiser fuses what eager mode runs op by op: the values agree to fp32
    # rounding of the initialisers' arithmetic (measured 3e-8 on weights of size ~0.1).
    assert result["max_abs"] < 1e-6


@pytest.mark.parametrize("case, message", [
    ("mesh_not_dividing", "8 devices do not divide by 3"),
    ("unknown_logical_axis", "unknown logical axis 'mpl'"),
    ("batch_not_divisible", "data.batch_size 12 is not divisible by the data-parallel size 8"),
    ("micro_batch_not_divisible", "4 rows a micro-batch, which is not divisible by the data-parallel size 8"),
    ("missing_rule", "['layers']['w_down']: logical axis 'mlp' has no rule"),
    ("ppo_minibatch_not_divisible",
     ("the actor's minibatch (data.prompts_per_iteration / ppo.minibatches) 4 is not divisible by the data-parallel "
     "size 8")),
    ("ppo_micro_batch_not_divisible",
     ("the critic's minibatch (data.prompts_per_iteration / ppo.minibatches) 8 / grad_accum_steps 4 = 2 rows a "
     "micro-batch, which is not divisible by the data-parallel size 4")),
    ("rollout_micro_batch_not_divisible", "rollout.micro_batch_size 4 is not divisible by the data-parallel size 8"),
])
def test_bad_input_fails_before_compiling(sharded, case, message):
    result = sharded["bad_input"][case]
    assert message in result["error"]
    assert result["compiles"] == 0
    # The control (a cached program on the mesh, then the error): the count sees its compile.
    control = sharded["bad_input"]["control_compile_then_fail"]
    assert control["error"] == "after compiling" and control["compiles"] > 0
    assert not sharded["bad_input"]["run_dir_created"]


# --- pure pieces (this process, one device) ------------------------------------------------------

@pytest.mark.parametrize("sizes, devices, expected", [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((1, 1, 1), 8, (1, 1, 1)),
    ((8, 8, 1), 64, (8, 8, 1)),
])
def test_mesh_shape_fills_the_remaining_devices(sizes, devices, expected):
    cfg = MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2])
    assert mesh_shape(cfg, devices) == expected


def test_mesh_shape_rejects_a_product_that_does_not_divide():
    with pytest.raises(ShardingError, match="needs a multiple of 6 devices"):
        mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=2), 8)


def test_logical_to_spec_follows_the_rules_and_rejects_reused_mesh_axes():
    rules = logical_rules(MeshConfig())
    spec = logical_to_spec(("layers", "embed", "heads", "head_dim"), rules)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert logical_to_spec(("batch", "length"), rules) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    with pytest.raises(ShardingError, match="mesh axis 'fsdp' shards two dimensions"):
        logical_to_spec(("batch", "embed"), rules, "activation")
    with pytest.raises(ShardingError, match="logical axis 'experts' has no rule"):
        logical_to_spec(("experts",), rules)


def test_an_activation_dimension_the_mesh_does_not_split_evenly_is_left_to_the_compiler():
    """A batch of 1 while sampling on 8 data-parallel devices: UNCONSTRAINED, not None (which
    would force a replicated copy on every device)."""
    rules, sizes = logical_rules(MeshConfig()), {"data": 8, "fsdp": 1, "tensor": 2}
    P = jax.sharding.PartitionSpec
    assert activation_spec((1, 16, 64), ("batch", "length", "heads"), rules, sizes) == P(P.UNCONSTRAINED, None, "tensor")
    assert activation_spec((8, 16, 3), ("batch", "length", "heads"), rules, sizes) == P(("data", "fsdp"), None,
                                                                                        P.UNCONSTRAINED)


def test_state_shardings_keep_the_tree_and_follow_the_logical_names():
    _, params = nnx.split(nnx.eval_shape(lambda: Llama(preset("tiny"), nnx.Rngs(0))))
    partitioner = Partitioner.from_config(MeshConfig())
    state = {"step": jax.ShapeDtypeStruct((), np.int32), "params": params}
    shardings = partitioner.shardings(state)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    assert shardings["params"]["layers"]["wq"].get_value().spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None)
    assert shardings["step"].spec == jax.sharding.PartitionSpec()
    placed = partitioner.put({"w": np.arange(6.0).reshape(2, 3)})
    np.testing.assert_array_equal(placed["w"], np.arange(6.0).reshape(2, 3))
    assert partitioner.put(placed)["w"] is placed["w"]  # already laid out as asked
    half = partitioner.put(placed, float_dtype=jnp.bfloat16)["w"]
    assert half.dtype == jnp.bfloat16 and half.sharding == placed["w"].sharding
    batch = partitioner.shard_batch({"input_ids": np.arange(8).reshape(2, 4)})
    assert batch["input_ids"].sharding == partitioner.batch_sharding


def test_a_failure_on_another_process_is_raised_here_as_its_kind(monkeypatch):
    """raise_together on a process whose own part succeeded, as the flags of two processes say:
    another's user error (2) is one here too (exit 2, one line), any other failure (1) a
    RuntimeError; no failure anywhere: nothing; its own error: that error."""
    from icegrt_jax import sharding
    from icegrt_jax.errors import UserInputError

    for flags, kind in (([0, 2], UserInputError), ([0, 1], RuntimeError)):
        monkeypatch.setattr(sharding, "gather_flags", lambda flag, _f=flags: np.array(_f))
        with pytest.raises(kind, match="loading the data: process 1 failed"), sharding.all_or_none("loading the data"):
            pass
    monkeypatch.setattr(sharding, "gather_flags", lambda flag: np.array([flag, 0]))
    with sharding.all_or_none("nothing fails"):
        pass
    with pytest.raises(ValueError, match="mine"), sharding.all_or_none("mine fails"):
        raise ValueError("mine")


def test_init_state_never_returns_an_argument_s_buffers():
    """The train steps donate the state: none of its arrays may be a caller's (PPO's reference
    model shares the initial actor's arrays)."""
    partitioner = Partitioner.from_config(MeshConfig())
    params = partitioner.put({"w": np.arange(6.0).reshape(2, 3)})
    state = partitioner.init_state(lambda p: {"params": p, "step": jnp.zeros((), jnp.int32)}, params)
    assert state["params"]["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()
    np.testing.assert_array_equal(state["params"]["w"], params["w"])


def test_distributed_start_is_recognised_from_the_environment():
    assert not wants_distributed({})
    assert not wants_distributed({"SLURM_NTASKS": "1"})
    assert wants_distributed({"SLURM_NTASKS": "16", "SLURM_STEP_NODELIST": "node[1-2]"})  # an srun task
    with pytest.raises(ShardingError, match="SLURM_NTASKS=16 but this process was not started by srun"):
        wants_distributed({"SLURM_NTASKS": "16"})  # the sbatch script itself: JAX's detection would fail
    assert not wants_distributed({"SLURM_NTASKS": "16", "ICEGRT_DISTRIBUTED": "0"})
    assert wants_distributed({"OMPI_COMM_WORLD_SIZE": "2"})
    assert wants_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert not initialize_distributed(env={})  # a single process needs no runtime


# --- icegrt plan (run inside the 8-device subprocess) ----------------------------------------------

def shard_bytes(model_cls, cfg, sizes: dict[str, int], rules, only=None) -> int:
    """Independent count: each dimension divided by the mesh sizes of its logical axis; bf16.
    ``only``: the top-level parameter names to count (default all)."""
    _, params = nnx.split(nnx.eval_shape(lambda: model_cls(cfg)))
    if only is not None:
        params = [params[name] for name in only]
    total = 0
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = leaf.get_metadata()["out_sharding"]
        ways = [int(np.prod([sizes[a] for a in rules[name]])) for name in names]
        total += int(np.prod([n // w for n, w in zip(leaf.shape, ways)])) * 2
    return total


def test_plan_counts_params_optimizer_gradients_and_kv_cache_exactly(sharded):
    from icegrt_jax.models.heads import ScoreModel

    result = sharded["plan"]
    assert result["code"] == 0 and "plan:   0%|          | 0/4" in result["progress"]  # a bar on stderr, --json clean
    plan = result["plan"]
    roles = {r["role"]: r for r in plan["roles"]}
    assert list(roles) == ["actor", "critic", "reference", "reward"]
    sizes, rules = {"data": 2, "fsdp": 2, "tensor": 2}, logical_rules(MeshConfig())
    tiny = preset("tiny", dtype="bfloat16", param_dtype="bfloat16")
    assert roles["actor"]["params"] == roles["reference"]["params"] == shard_bytes(Llama, tiny, sizes, rules)
    assert roles["critic"]["params"] == roles["reward"]["params"] == shard_bytes(ScoreModel, tiny, sizes, rules)
    for role in ("actor", "critic"):  # AdamW: two moments in the param dtype, plus step counters
        assert 2 * roles[role]["params"] <= roles[role]["optimizer"] <= 2 * roles[role]["params"] + 64
        assert roles[role]["gradients"] == roles[role]["params"]
    assert roles["reference"]["optimizer"] == roles["reward"]["gradients"] == 0
    # 2 layers x k and v of rows 16 / 4, kv heads 2 / 2, slots 32 + 32, head_dim 16, in bf16
    assert roles["actor"]["kv_cache"] == 2 * 2 * (16 // 4) * 64 * 1 * 16 * 2
    head = "embed" if tiny.tie_word_embeddings else "lm_head"  # the sampler's copy: layers + LM head, bf16
    assert roles["actor"]["decode_weights"] == shard_bytes(Llama, tiny, sizes, rules, only=("layers", head)) > 0
    assert plan["transients"]["generate"] == (roles["actor"]["kv_cache"] + roles["actor"]["decode_weights"]
                                              + plan["transients"]["score: actor"])
    assert all(r["activations"] > 0 for r in roles.values())
    assert plan["peak"] == plan["resident"] + max(plan["transients"].values())
    assert plan["resident"] == sum(r["params"] + r["optimizer"] for r in roles.values())
    assert plan["fits"] and plan["mesh"] == sizes


def test_plan_of_micro_batched_rollouts_holds_a_quarter_of_the_kv_cache(sharded):
    """``rollout.micro_batch_size=4`` of 16 rows: the KV cache is the cache of 4 rows (a quarter),
    and every scoring forward's compiled temporaries shrink (they are the same programs the
    trainer runs, in pieces)."""
    whole, micro = sharded["plan"]["plan"], sharded["plan"]["micro_plan"]
    assert micro["shapes"]["generation_rows"] == 4 and whole["shapes"]["generation_rows"] == 16
    assert micro["roles"][0]["kv_cache"] * 4 == whole["roles"][0]["kv_cache"]
    for role in ("actor", "critic", "reference", "reward"):
        assert micro["transients"][f"score: {role}"] < 0.75 * whole["transients"][f"score: {role}"], role
    assert micro["transients"]["update: actor"] == whole["transients"]["update: actor"]


def test_micro_batched_scoring_matches_one_device(sharded):
    """The trainer's scoring forwards on (2,2,2), 4 of 16 rows at a time, against all rows at once
    on one device: fp32 summation order only (log-probs of size ~5: measured 1.9e-6)."""
    assert sharded["chunked_scoring"]["logprobs"] < 1e-5
    assert sharded["chunked_scoring"]["values"] < 1e-5
    # Piece i takes rows i, i + 4, ...: each device's block holds its share of every piece, no row
    # changes device, so the chunked program has the whole-batch program's permutes (one: the score
    # head's vector), no more. The control, contiguous pieces, adds all-to-alls that move rows.
    result = sharded["chunked_scoring"]
    assert result["permutes_chunked"] == result["permutes_whole"] < result["permutes_contiguous"]


def test_each_data_parallel_device_scores_its_own_rows_in_the_chunked_lm_head(sharded):
    assert sharded["chunked_logprobs_gathers"] == {"forward": 0, "gradient": 0}


def test_gradient_accumulation_leaves_every_row_on_its_device(sharded):
    assert sharded["micro_batch_row_moves"] == 0


def test_plan_rejects_a_rollout_batch_the_mesh_cannot_split(sharded):
    assert sharded["plan"]["bad_code"] == 2
    assert ("minibatch (data.prompts_per_iteration / ppo.minibatches) 6 / grad_accum_steps 2 = 3 rows a "
            "micro-batch, which is not divisible by the data-parallel size 4") in sharded["plan"]["bad_error"]
