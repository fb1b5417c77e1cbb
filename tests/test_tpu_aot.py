"""Programs compiled for a TPU from this CPU host, ahead of time (libtpu from the test extra's
``jax[tpu]``): the attention backend follows the devices a program is compiled for, not the host's
default device, so ``splash`` is selectable and ``auto`` picks it for causal rows, and the Pallas
prompt-tree kernel (``tree``) for prompt-tree rows (branches)."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from rmjax import sharding as shd
from rmjax.errors import ConfigError
from rmjax.models import attention as attn
from rmjax.models import config_from_hf
from rmjax.models.attention import target_platform
from rmjax.models.transformer import abstract_params, forward

pytest.importorskip("libtpu", reason="the TPU compiler comes with the test extra (jax[tpu])")

HF = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 256,
      "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
      "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}
T = 256


@pytest.fixture(scope="module")
def tpu_mesh():
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    return shd.make_mesh(shd.MeshConfig(strategy="fsdp", fsdp=-1), devices=devices)


def shapes():
    """fp32 param shapes, nothing allocated (the kernel choice does not change them)."""
    boxed = abstract_params(config_from_hf(HF, attention="blockwise"))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.value.shape, jnp.float32), boxed,
                        is_leaf=lambda x: hasattr(x, "value"))


def compiled_text(mesh, attention: str, branches: bool) -> str:
    config = config_from_hf(HF, attention=attention, dtype="bfloat16")
    with shd.activate(mesh, "fsdp"):
        params = shapes()
        ids = jax.ShapeDtypeStruct((4, T), jnp.int32)
        # branches: positions, segment and branch ids as inputs (the prompt-tree layout of packed rows)
        fn = jax.jit(lambda p, i, pos, seg, br: forward(p, config, i, positions=pos, segment_ids=seg,
                                                         branch_ids=br).hidden) if branches else \
            jax.jit(lambda p, i: forward(p, config, i).hidden)
        assert target_platform() == "tpu"
        if branches:
            return fn.lower(params, ids, ids, ids, ids).compile().as_text()
        return fn.lower(params, ids).compile().as_text()


def test_splash_is_selected_when_compiling_for_a_tpu_from_a_cpu_host(tpu_mesh):
    assert jax.devices()[0].platform == "cpu" and target_platform() == "cpu"
    for attention in ("splash", "auto"):
        assert "splash_mqa_fwd" in compiled_text(tpu_mesh, attention, branches=False), attention
    # prompt trees: splash cannot express branches, auto takes the tree kernel
    text = compiled_text(tpu_mesh, "auto", branches=True)
    assert "tree_attention_fwd" in text and "splash_mqa" not in text
    with pytest.raises(ConfigError, match="cannot express prompt-tree branches"):
        compiled_text(tpu_mesh, "splash", branches=True)


def test_tree_kernel_forward_and_backward_compile_for_a_tpu(tpu_mesh):
    """The prompt-tree kernel's three Mosaic kernels (forward, dq, dk/dv) compiled for the topology,
    bf16 with soft-cap and a traced window, 1024 tokens per row with branches, per device on the mesh;
    ``auto`` picks it for branch rows (and for lengths splash cannot take), splash for plain packed rows."""
    b, t, hkv, g, d = 4, 1024, 2, 2, 128
    spec = attn.AttentionSpec(scale=d ** -0.5, softcap=30.0, backend="tree")
    q = jax.ShapeDtypeStruct((b, t, hkv, g, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, k, v, seg, pos, br, window):
        tok = attn.Tokens(seg, pos, br)
        return jnp.sum(attn.attend(q, k, v, tok, tok, spec, window).astype(jnp.float32))

    with shd.activate(tpu_mesh, "fsdp"):
        assert target_platform() == "tpu"
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        text = step.lower(q, kv, kv, ids, ids, ids, jax.ShapeDtypeStruct((), jnp.int32)).compile().as_text()
        for kernel in ("tree_attention_fwd", "tree_attention_dq", "tree_attention_dkv"):
            assert kernel in text, kernel
        auto = dataclasses.replace(spec, backend="auto")
        tree, plain = attn.Tokens(ids, ids, ids), attn.Tokens(ids, ids)
        assert attn.resolve_backend(auto, q, kv, tree) == "tree"
        assert attn.resolve_backend(auto, q, kv, plain) == "splash"
        odd = jax.ShapeDtypeStruct((b, 1000, hkv, g, d), jnp.bfloat16)  # not a multiple of 128
        assert attn.resolve_backend(auto, odd, odd, plain) == "tree"
        prefix = dataclasses.replace(auto, causal=False)  # a cached prefix: neither kernel
        assert attn.resolve_backend(prefix, q, kv, tree) == "blockwise"


def test_splash_for_the_host_is_a_clear_error():
    config = config_from_hf(HF, attention="splash", dtype="bfloat16")
    params = shapes()
    with pytest.raises(ConfigError, match=r"splash attention needs a TPU \(compiling for cpu\)"):
        jax.jit(lambda p, i: forward(p, config, i).hidden).lower(params, jax.ShapeDtypeStruct((1, T), jnp.int32))


# ---------------------------------------------------------------- rmjax plan (here: libtpu serves one process,
# so every test that compiles for a TPU topology lives in this file, on one test worker)

BIG = {**HF, "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 8,
       "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False}


def plan_config(tmp_path, hf: dict, *overrides: str):
    from rmjax import config as rconfig
    from rmjax.jobs.plan import PlanConfig

    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    return rconfig.load(PlanConfig, None, [f"model.name={path}", "topology=v5e:2x2", "data.max_length=256",
                                           "train.batch_size=8", *overrides])


@pytest.mark.parametrize("overrides", [("train.trainable=full",), ("train.trainable=lora", "train.grad_accum=2"),
                                       ("train.trainable=full", "batch.layout=padded", "model.remat=full")])
def test_plan_reports_the_compiled_steps_memory_and_counts_every_loop_iteration(tmp_path, overrides):
    """`rmjax plan`'s memory figures are XLA's memory_analysis() of the very step it compiled for the
    topology; its matmul FLOPs count the layer and micro-batch scans by their trip counts (XLA's own
    analysis counts each body once) and equal the analytic count over the rows' positions (10%)."""
    from rmjax import planning
    from rmjax import sharding as shd
    from rmjax.jobs import plan

    config = plan_config(tmp_path, {**HF, "num_hidden_layers": 4}, *overrides)
    record = plan.one(config)
    assert record["chip"] == "TPU v5 lite" and record["chips"] == 4 and record["fits"]
    devices = planning.topology_devices("v5e:2x2")
    model = dataclasses.replace(config_from_hf(planning.hf_config(config.model.name), **config.model.numerics()),
                                lm_head=False)
    mesh = shd.make_mesh(shd.MeshConfig.for_strategy(config.mesh.strategy), devices=devices)
    fn, state, frozen, batch, _ = planning.abstract_step(config, model, mesh, sequence=256)
    with shd.activate(mesh, config.mesh.strategy):
        mem = fn.lower(state, frozen, batch).compile().memory_analysis()
    m = record["memory"]
    assert m["arguments_gib"] == round(mem.argument_size_in_bytes / 2 ** 30, 3)
    assert m["temporaries_gib"] == round(mem.temp_size_in_bytes / 2 ** 30, 3)
    assert m["outputs_gib"] == round(mem.output_size_in_bytes / 2 ** 30, 3)
    f = record["flops"]
    if config.model.remat == "none":
        assert f["matmuls_counted"] == pytest.approx(f["matmuls_analytic_on_padded_rows"], rel=0.10)
    else:  # the recomputed forward of every layer on top
        assert f["matmuls_counted"] > 1.2 * f["matmuls_analytic_on_padded_rows"]
    assert f["xla_cost_analysis"] < 0.5 * f["matmuls_counted"]  # the scans XLA counts once
    e = record["estimate"]
    assert e["step_seconds"] > 0 and e["tokens_per_s"] > 0 and 0 < e["mfu"] <= 1


def test_plan_says_a_model_too_big_for_the_chips_does_not_fit(tmp_path, capsys):
    """A ~9B-parameter decoder trained in full (fp32 weights and AdamW moments) on four 16 GB v5e chips:
    "does not fit" with the per-chip figure; the command prints one line per plan and writes the
    records (search: fitting candidates first)."""
    from rmjax.cli import main

    path = tmp_path / "big.json"
    path.write_text(json.dumps(BIG))
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(path), "--topology", "v5e:2x2", "--trainable", "full", "--max-length",
                 "512", "--batch-size", "4", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "does not fit" in line and "GiB per chip of 16 GiB" in line
    record = json.loads(out.read_text())[0]
    assert not record["fits"] and record["memory"]["peak_gib"] > record["memory"]["hbm_gib"]
    # ~7.9B fp32 params (no LM head: a scalar RM) and their two AdamW moments over 4 chips: 22 GiB each
    assert record["memory"]["arguments_gib"] > 20 and record["estimate"]["step_seconds"] is None


def test_plan_search_lists_the_candidates_that_fit_first(tmp_path):
    from rmjax.jobs import plan

    config = plan_config(tmp_path, {**HF, "num_hidden_layers": 2}, "search=true", "search_strategies=[fsdp]",
                         "search_micro_batches=[1,3]", "search_remat=[none,full]", f"out={tmp_path / 's.json'}")
    records = plan.run(config, log=lambda m: None)  # 3 does not divide the 8 examples: 2 candidates
    assert len(records) == 2 and all(r["fits"] for r in records)
    seconds = [r["estimate"]["step_seconds"] for r in records]
    assert seconds == sorted(seconds) and [r["remat"] for r in records] == ["none", "full"]  # less recomputed
    assert json.loads((tmp_path / "s.json").read_text()) == records


def test_attention_pairs_count_what_each_token_sees():
    """The analytic attention count: for packed prompt trees, every (query, key) pair the kernel
    computes (same segment, causal, a branch sees its prompt and itself), by brute force."""
    import numpy as np

    from rmjax import planning
    from rmjax.data.batching import Encoded, build_packed

    rng = np.random.default_rng(0)
    trees = {k: Encoded(np.ones(rng.integers(1, 9), np.int32), tuple(np.ones(rng.integers(1, 6), np.int32)
                                                                       for _ in range(rng.integers(1, 4))))
             for k in range(6)}
    pb = build_packed(trees, [[0, 1, 2], [3, 4, 5]], 64, 0)
    a = pb.arrays
    brute = 0
    for r in range(2):
        seg, br = a["segment_ids"][r], a["branch_ids"][r]
        for i in range(64):
            for j in range(i + 1):
                brute += bool(seg[i] and seg[i] == seg[j] and (br[j] == 0 or br[j] == br[i]))
    config = config_from_hf(HF)
    assert planning.attention_pairs(a, config) == (brute, brute)


@pytest.mark.parametrize("role, layout", [("policy", "packed"), ("rm", "kv"), ("features", "packed"),
                                          ("policy", "vocab_scan")])
def test_plan_sizes_a_batch_of_the_scoring_engine(tmp_path, role, layout):
    """`rmjax plan --job score`: the memory figures are memory_analysis() of the very function
    `rmjax score` runs (packed trees or the KV-cache path; log-probs or a reward head; `rmjax features`;
    the vocabulary scan's batch of 512 replies to one prompt), compiled for
    the topology on its batch; the counted matmul FLOPs equal the analytic count over the rows'
    positions (10%), the layer scan counted by its trip count."""
    from rmjax import planning
    from rmjax.jobs import plan

    config = plan_config(tmp_path, {**HF, "num_hidden_layers": 4}, "job=score", f"score_role={role}",
                         f"score_layout={layout}", "score_batch_tokens=2048")
    record = plan.one(config)
    assert record["job"] == "score" and record["chips"] == 4 and record["fits"] and record["layout"] == layout
    mesh = shd.make_mesh(shd.MeshConfig.for_strategy("fsdp"), devices=planning.topology_devices("v5e:2x2"))
    fn, params, head, batch, host, n, _ = planning.abstract_score(
        config.model.name, mesh, role=role, layout=layout, numerics=config.model.numerics(), sequence=256,
        batch_tokens=2048)
    with shd.activate(mesh, "fsdp"):
        mem = fn.lower(params, head, batch).compile().memory_analysis()
    assert record["memory"]["arguments_gib"] == round(mem.argument_size_in_bytes / 2 ** 30, 3)
    assert record["memory"]["temporaries_gib"] == round(mem.temp_size_in_bytes / 2 ** 30, 3)
    assert record["batch"]["examples"] == n and (n > 1 or layout == "vocab_scan")
    f = record["flops"]
    assert f["matmuls_counted"] == pytest.approx(f["matmuls_analytic_on_padded_rows"], rel=0.10)
    assert f["xla_cost_analysis"] < 0.5 * f["matmuls_counted"]  # the layer scan XLA counts once
    assert 0 < record["estimate"]["mfu"] <= 1


def test_plan_compiles_for_several_slices(tmp_path):
    """A multi-slice topology (two v5e:2x2 slices joined by the data-centre network): the data axis
    spans the slices, each slice one data-parallel replica, and the train step compiles for all 8 chips."""
    from rmjax import planning
    from rmjax.jobs import plan

    devices = planning.topology_devices("v5e:2x2", num_slices=2)
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    mesh = shd.make_mesh(shd.MeshConfig(strategy="fsdp", data=2, fsdp=4), devices=devices)
    assert [{d.slice_index for d in mesh.devices[i].flat} for i in (0, 1)] == [{0}, {1}]
    with pytest.raises(shd.MeshError, match="2 slices need the data axis"):
        shd.make_mesh(shd.MeshConfig(strategy="fsdp", fsdp=8), devices=devices)
    record = plan.one(plan_config(tmp_path, HF, "num_slices=2", "mesh.data=2"))
    assert record["chips"] == 8 and record["topology"] == "v5e:2x2 x 2 slices" and record["fits"]
    assert record["mesh"].startswith("data=2")


# Every family, every strategy and every job compiled for the TPU at least once (a covering design,
# not the full product: each compile costs seconds): (test model case, strategy, job, overrides).
MATRIX = [
    ("llama_gqa_tied", "fsdp", "train", ("train.trainable=lora",)),
    ("llama_mha_untied_rope3", "dp", "score", ("score_role=rm",)),
    ("qwen2_bias", "fsdp_tp", "train", ("train.trainable=full", "batch.layout=padded")),
    ("qwen3_qknorm_window", "tp", "score", ("score_layout=kv",)),
    ("mistral_window", "fsdp_sp", "train", ("train.trainable=full",)),
    ("gemma2_softcap_window", "fsdp", "score", ()),
    ("gemma3_window", "fsdp_tp", "train", ("train.trainable=lora", "model.remat=full")),
]


@pytest.mark.parametrize("case, strategy, job, overrides", MATRIX, ids=[m[0] for m in MATRIX])
def test_every_family_strategy_and_job_compiles_for_a_tpu(tmp_path, case, strategy, job, overrides):
    """The tiny test layouts of every family (windows, soft-caps, biases, q/k norms, untied heads),
    compiled ahead of time for v5e:2x2 under every sharding strategy, as train steps (packed and
    padded, LoRA and full) and scoring batches (packed and KV, log-probs and a reward head), in bf16
    with the attention kernel ``auto`` picks for a TPU."""
    import transformers
    from hf_models import CASES, TINY

    from rmjax.jobs import plan

    cfg_cls, _, kw = CASES[case]
    hf = getattr(transformers, cfg_cls)(**{**TINY, **kw, "max_position_embeddings": 1024}).to_dict()
    config = plan_config(tmp_path, hf, f"job={job}", f"mesh.strategy={strategy}", "model.dtype=bfloat16",
                         "data.max_length=128", "score_batch_tokens=1024", *overrides)
    record = plan.one(config)
    assert record["fits"] and record["chips"] == 4 and record["strategy"] == strategy
    assert record["flops"]["matmuls_counted"] > 0 and record["memory"]["arguments_gib"] >= 0
