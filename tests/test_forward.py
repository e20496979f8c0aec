"""The workers' forward: the Hugging Face model itself with torch hooks on its modules, against the
TransformerLens bridge, on four architectures built locally (random init from a config) and the
real MiniLM; and the bridge's forward kept for hooks that exist only inside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from actscope.pipeline.model import (
    HookedForward,
    ModuleForward,
    ModuleSite,
    forward_plan,
    hook_widths,
    job_forward,
    load_hf_model,
    load_model,
    load_skeleton,
    module_sites,
    per_token_hooks,
    prefer_sdpa,
)
from actscope.storage.record import ModelRecord
from actscope.storage.spec import JobSpec

# The hooks researchers record most; every architecture must have them on its modules.
COMMON = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_pre", "mlp.hook_post")


def _configs(vocab: int) -> dict:
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    return {
        # RMSNorm, rotary, gated MLP, grouped-query attention (4 query heads, 2 key/value heads)
        "llama": LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)),
        # Pythia-style: parallel attention and MLP, partial rotary, fused QKV
        "neox": GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True)),
        "bert": BertForMaskedLM(BertConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)),
    }


@pytest.fixture(scope="module")
def architectures(tmp_path_factory, tiny_model, minilm) -> dict[str, str]:
    """{name: model folder}: the tiny GPT-2, random LLaMA, GPT-NeoX and BERT sharing its tokenizer,
    and the real MiniLM."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    root = tmp_path_factory.mktemp("architectures")
    models = {"gpt2": str(tiny_model), "minilm": minilm}
    torch.manual_seed(0)
    for name, model in _configs(len(tokenizer)).items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        models[name] = str(root / name)
    return models


def _spec(model: str, hooks: list[str]) -> JobSpec:
    return JobSpec.from_dict({"model": model, "dataset": {"path": "text"}, "hooks": hooks, "store": "/nonexistent/s.zarr"})


def _bridge_values(bridge, hooks: list[str], tokens, mask) -> dict[str, torch.Tensor]:
    """Every hook the bridge's forward fires with one vector per token, as [batch, pos, width]."""
    captured = {}
    for hook in hooks:
        bridge.add_hook(hook, lambda tensor, hook, name=hook: captured.__setitem__(name, tensor))
    try:
        with torch.inference_mode():
            bridge(tokens, attention_mask=mask, return_type=None)
    finally:
        bridge.reset_hooks()
    return {h: t.reshape(*tokens.shape, -1) for h, t in captured.items() if t.shape[:2] == tokens.shape}


@pytest.mark.parametrize("name", ["gpt2", "llama", "neox", "bert", "minilm"])
def test_module_hooks_equal_the_bridge(architectures, name):
    """Every hook the plan puts on a Hugging Face module (SDPA attention) equals the bridge's value
    (SDPA where the bridge can, as workers ran it before) within 1e-5, float32, padding excluded."""
    path = architectures[name]
    bridge = load_model(path, torch.device("cpu"))
    prefer_sdpa(bridge, ["blocks.0.mlp.hook_post"])
    sites = module_sites(bridge, per_token_hooks(bridge))
    n_layers = bridge.cfg.n_layers
    for layer in range(n_layers):
        for common in COMMON:
            assert f"blocks.{layer}.{common}" in sites, (name, common)
    torch.manual_seed(1)
    tokens = torch.randint(5, 500, (3, 24))
    mask = torch.ones_like(tokens)
    mask[1, 17:] = 0
    reference = _bridge_values(bridge, list(sites), tokens, mask)
    assert len(reference) >= 6 * n_layers
    plan = forward_plan(bridge, list(reference))
    assert plan["class"] == type(bridge.original_model).__name__
    model = load_hf_model(_spec(path, list(reference)), plan["class"], torch.device("cpu"))
    assert model.config._attn_implementation == "sdpa"
    got = ModuleForward(model, {h: ModuleSite(*s) for h, s in plan["sites"].items()}, None)(tokens, mask)
    keep = mask.bool()
    worst = {h: (got[h] - reference[h]).abs()[keep].max().item() for h in reference}
    assert max(worst.values()) <= 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


def _without_weights(model: str, root: Path) -> Path:
    """A copy of a model folder with its config and tokenizer and none of its weights."""
    shutil.copytree(model, root, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pt", "*.h5", "*.onnx", "onnx", "openvino"))
    return root


@pytest.mark.parametrize("name", ["gpt2", "llama", "neox", "bert", "minilm"])
def test_the_plans_skeleton_knows_the_model_without_its_weights(architectures, name, tmp_path):
    """The plan builds the model from a folder holding only its config and tokenizer, with fake
    parameters: the same hooks, widths, forward plan and weight bytes as the model loaded whole.
    A hook only the bridge's forward has gives no width (the plan then loads the weights)."""
    path = architectures[name]
    skeleton = load_skeleton(str(_without_weights(path, tmp_path / "bare")))
    bridge = load_model(path, torch.device("cpu"))
    assert sorted(skeleton.bridge.hook_dict) == sorted(bridge.hook_dict)
    tokens = torch.randint(5, 500, (1, 4))
    hooks = list(_bridge_values(bridge, list(module_sites(bridge, per_token_hooks(bridge))), tokens, torch.ones_like(tokens)))
    assert len(hooks) >= 6 * bridge.cfg.n_layers
    assert skeleton.widths(hooks) == hook_widths(bridge, hooks)
    assert forward_plan(skeleton.bridge, hooks) == forward_plan(bridge, hooks)
    assert skeleton.weight_bytes("float32") == sum(p.numel() * p.element_size() for p in bridge.original_model.parameters())
    assert skeleton.weight_bytes("bfloat16") * 2 == skeleton.weight_bytes("float32")
    bridged = [h for h in per_token_hooks(bridge) if h not in set(hooks) and h.startswith("blocks.0.")]
    if bridged:
        assert skeleton.widths(bridged[:1]) == {}
        assert skeleton.widths([*hooks[:3], bridged[0]]) == hook_widths(bridge, hooks[:3])  # the others are still measured


def test_a_config_without_weights_is_planned_for_the_workers_memory(tiny_model, corpus_dir, tmp_path):
    """``run --dry-run --worker-memory`` plans a job from a folder with no weights, for workers of
    the memory given (not this machine's), and refuses it, with its numbers, where it needs more."""
    from typer.testing import CliRunner

    from actscope.jobs.cli import app
    from tests.conftest import write_job

    job = write_job(tmp_path, "bare", _without_weights(tiny_model, tmp_path / "bare-model"), corpus_dir)
    runner = CliRunner()
    planned = runner.invoke(app, ["run", str(job), "--dry-run", "--worker-memory", "3GiB"], env={"COLUMNS": "300"})
    assert planned.exit_code == 0, planned.output
    assert "of 3.00 GiB available" in planned.output and "store: at most" in planned.output
    refused = runner.invoke(app, ["run", str(job), "--dry-run", "--worker-memory", "100MB"], env={"COLUMNS": "300"})
    assert refused.exit_code == 2 and "95.4 MiB is available" in refused.output, refused.output
    assert not (tmp_path / "bare.zarr").exists()
    # ``actscope hooks`` lists the folder's hooks and widths too (a hook only the bridge has: "?").
    listed = runner.invoke(app, ["hooks", str(tmp_path / "bare-model")], env={"COLUMNS": "300"})
    assert listed.exit_code == 0 and "blocks.{0..1}.mlp.hook_post 256" in " ".join(listed.output.split()), listed.output


def test_the_forward_stops_after_the_last_hooked_block(architectures):
    path = architectures["llama"]
    bridge = load_model(path, torch.device("cpu"))
    plan = forward_plan(bridge, ["blocks.0.mlp.hook_post"])
    store_model = ModelRecord(forward=plan)
    forward = job_forward(_spec(path, ["blocks.0.mlp.hook_post"]), store_model, torch.device("cpu"))
    assert isinstance(forward, ModuleForward)
    ran = []
    forward.model.get_submodule(plan["blocks"][1]).register_forward_pre_hook(lambda *a: ran.append(1))
    norm = forward.model.get_submodule("model.norm")
    norm.register_forward_pre_hook(lambda *a: ran.append(2))
    tokens = torch.randint(5, 500, (2, 8))
    out = forward(tokens, torch.ones_like(tokens))
    assert out["blocks.0.mlp.hook_post"].shape == (2, 8, 96) and ran == []


def test_hooks_only_inside_the_bridge_keep_its_forward(architectures, tmp_path):
    """GPT-2's bridge splits the fused QKV projection: ``hook_z`` (the input of its own ``o``) has
    no Hugging Face module, so a job recording it runs the bridge's forward; the plan says so."""
    path = architectures["gpt2"]
    bridge = load_model(path, torch.device("cpu"))
    hooks = ["blocks.0.mlp.hook_post", "blocks.1.attn.hook_z"]
    plan = forward_plan(bridge, hooks)
    assert plan == {"bridge_only": ["blocks.1.attn.hook_z"]}
    forward = job_forward(_spec(path, hooks), ModelRecord(forward=plan), torch.device("cpu"))
    assert isinstance(forward, HookedForward)
    tokens = torch.randint(5, 500, (2, 8))
    out = forward(tokens, torch.ones_like(tokens))
    assert out["blocks.1.attn.hook_z"].shape == (2, 8, 64)
    # A store made before module hooks (no "forward" in its model record) runs the bridge too.
    assert isinstance(job_forward(_spec(path, hooks[:1]), ModelRecord(), torch.device("cpu")), HookedForward)


def test_a_local_folder_named_like_a_hub_alias_loads_the_folder(architectures, tmp_path, monkeypatch):
    """TransformerLens reads some bare names ("neox") as aliases of hub models; a folder of that
    name in the working directory is the user's model, not a download."""
    shutil.copytree(architectures["neox"], tmp_path / "neox")
    monkeypatch.chdir(tmp_path)
    bridge = load_model("neox", torch.device("cpu"))
    assert Path(bridge.original_model.name_or_path).resolve() == (tmp_path / "neox").resolve()


@pytest.mark.slow
def test_the_device_benchmark_runs_and_its_plan_is_the_planners(tiny_model, tmp_path):
    """``benchmarks/bench_device.py`` (made for a GPU machine without TransformerLens, so its
    GPT-2 forward plan is written out) agrees with the planner, and runs at a tiny shape here."""
    import json
    import subprocess
    import sys

    from tests.test_cuda import _bench

    bridge = load_model(str(tiny_model), torch.device("cpu"))
    plan = forward_plan(bridge, ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"])
    assert plan == _bench().gpt2_plan(2)
    args = ["--layers", "2", "--d-model", "64", "--vocab", "600", "--ctx", "32", "--batch", "4", "--seqs", "8", "--dtypes", "float32",
            "--device", "cpu", "--threads", "1"]
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "bench_device.py"), *args],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)["results"][0]
    assert {"bare", "hooked", "top-k only", "every statistic but co-activation", "every statistic"} <= set(result)
    assert result["every statistic"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_the_sae_benchmark_runs_and_its_plan_is_the_planners(tiny_model):
    """``benchmarks/bench_sae.py`` (also made for the GPU machine) writes out the planner's plan
    for the last residual stream, and runs at a tiny shape here: its SAEs fire about l0 a token."""
    import importlib.util
    import json
    import subprocess
    import sys

    path = Path(__file__).parents[1] / "benchmarks" / "bench_sae.py"
    spec = importlib.util.spec_from_file_location("bench_sae", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    bridge = load_model(str(tiny_model), torch.device("cpu"))
    assert forward_plan(bridge, ["blocks.1.hook_resid_post"]) == module.resid_plan(2)
    args = ["--layers", "2", "--d-model", "64", "--vocab", "600", "--ctx", "32", "--batch", "4", "--seqs", "8", "--l0", "8",
            "--device", "cpu", "--threads", "1"]
    done = subprocess.run([sys.executable, str(path), *args], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)["results"]
    assert result["hook + topk SAE"]["measured_l0"] == 8.0
    assert 4 <= result["hook + jumprelu SAE"]["measured_l0"] <= 16
    assert set(result["hook + topk SAE"]["statistics_ms_per_batch"]) >= {"top", "moments", "histogram", "token sums"}
    for run in result["hook + topk SAE"]["coactivation"]:  # the latents' pairs stay within the plan's bound
        assert 0 < run["latent_pairs_met"] <= run["plan_bound_pairs"] and run["merge_rows"] > 0
