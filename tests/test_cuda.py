"""Exactness on a CUDA device: the workers' forward and every statistic of a group on the GPU
against the same work on the CPU. Marked ``cuda``; skipped where torch sees no CUDA device (the
development and CI machines). On the lent GPU machine: ``python -m pytest -m cuda``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_device.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_device", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_module_forward_on_cuda_equals_the_cpu(tiny_model):
    from actscope.pipeline.model import ModuleForward, ModuleSite, load_hf_model
    from actscope.storage.spec import JobSpec

    bench = _bench()
    plan = bench.gpt2_plan(2)
    spec = JobSpec.from_dict({"model": str(tiny_model), "dataset": {"path": "text"}, "hooks": list(plan["sites"]), "store": "/nonexistent"})
    sites = {h: ModuleSite(*s) for h, s in plan["sites"].items()}
    tokens = torch.randint(0, 600, (4, 32))
    mask = torch.ones_like(tokens)
    mask[2, 20:] = 0
    cpu = ModuleForward(load_hf_model(spec, plan["class"], torch.device("cpu")), sites, plan["blocks"][-1])(tokens, mask)
    gpu = ModuleForward(load_hf_model(spec, plan["class"], torch.device("cuda")), sites, plan["blocks"][-1])(tokens.cuda(), mask.cuda())
    for hook in sites:
        got = gpu[hook].cpu()[mask.bool()]
        np.testing.assert_allclose(got.numpy(), cpu[hook][mask.bool()].numpy(), atol=1e-5, rtol=1e-5, err_msg=hook)


def test_a_group_on_cuda_equals_the_cpu(tmp_path, tiny_model):
    """Every partial a worker writes for one group, on the GPU and on the CPU, from the same
    tokens: integer arrays (ranks, token indices, counts) identical, float sums within 1e-4."""
    from types import SimpleNamespace

    from actscope.pipeline.worker import ShardWorker
    from actscope.storage.store import Store

    bench = _bench()
    args = SimpleNamespace(layers=2, d_model=64, vocab=600, ctx=32, batch=4, seqs=24, device="cpu")
    statistics = bench.JOBS["every statistic"]
    parts = {}
    for device in ("cpu", "cuda"):
        args.device = device
        url = bench.make_store(str(tmp_path / f"{device}.zarr"), str(tiny_model), args, "float32", statistics)
        ShardWorker(url, threads=1)(0)
        store = Store.open(url)
        parts[device] = {h: store.read_partial(0, h) for h in [*store.spec.hooks, "coactivation"]}
    for hook, arrays in parts["cpu"].items():
        for name, expected in arrays.items():
            got = parts["cuda"][hook][name]
            if np.issubdtype(expected.dtype, np.floating):
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"{hook} {name}")
            else:
                np.testing.assert_array_equal(got, expected, err_msg=f"{hook} {name}")


def _latent_partials(device: str) -> dict:
    """The partials of one SAE site (sparse paths: non-zeros, sparse token sums) over four
    batches of the same latents on ``device``."""
    from actscope.pipeline import sampling
    from actscope.pipeline.reducers import Group, HookStatistics
    from actscope.pipeline.worker import Batch
    from actscope.storage.spec import JobSpec

    rng = np.random.default_rng(5)
    latents = torch.from_numpy(((rng.random((512, 300)) < 0.02) * rng.gamma(2.0, 1.0, (512, 300))).astype(np.float32))
    tokens = torch.from_numpy(rng.integers(0, 50, 512))
    counted = torch.from_numpy(rng.random(512) < 0.95)
    spec = JobSpec.from_dict({"model": "m", "dataset": {"path": "text"}, "hooks": ["h"], "store": "s", "top_tokens": 4, "min_token_count": 2,
                              "saes": [{"name": "lat", "path": "sae", "hook": "h"}]})
    dev = torch.device(device)
    stats = HookStatistics(spec, Group("lat", 300, tokens.to(dev), counted.to(dev), 0))
    for b0 in range(0, 512, 128):
        span = slice(b0, b0 + 128)
        index = torch.arange(b0, b0 + 128, device=dev)
        stats.update(latents[span].to(dev), Batch(first=b0, counted=counted[span].to(dev), global_index=index, token_ids=tokens[span].to(dev),
                                                  docs=torch.zeros(128, dtype=torch.int64, device=dev), priority=sampling.priority(index, spec.seed)))
    return stats.result()


def test_sparse_latent_statistics_on_cuda_equal_the_cpu():
    """An SAE site's statistics from the same latents on both devices: the GPU sums by sorted
    segments where the CPU adds in order, so integer arrays are identical and float sums agree
    to float64 rounding."""
    cpu, gpu = _latent_partials("cpu"), _latent_partials("cuda")
    assert set(cpu) == set(gpu)
    for name, expected in cpu.items():
        if np.issubdtype(expected.dtype, np.floating):
            np.testing.assert_allclose(gpu[name], expected, rtol=1e-9, atol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(gpu[name], expected, err_msg=name)


def test_sae_encoders_on_cuda_equal_the_cpu(tmp_path):
    from actscope.pipeline.sae import Encoder, read_config
    from actscope.storage.spec import SAESpec
    from tests.saes import write_sae

    x = torch.from_numpy(np.random.default_rng(1).normal(0, 1, (256, 16)).astype(np.float32))
    for architecture, extra in (("jumprelu", {}), ("gated", {}), ("abstopk", {"k": 6}), ("skip_transcoder", {"d_out": 24, "skip": True})):
        folder = write_sae(tmp_path / architecture, d_in=16, d_sae=48, architecture=architecture, seed=3, **extra)
        info = read_config(SAESpec(name="s", path=str(folder), hook="blocks.1.hook_resid_post"))
        cpu, gpu = Encoder(info, torch.device("cpu")), Encoder(info, torch.device("cuda"))
        np.testing.assert_allclose(gpu.encode(x.cuda()).cpu().numpy(), cpu.encode(x).numpy(), atol=1e-5, err_msg=architecture)


def _latent_coactivation(device: str) -> dict:
    """One shard's co-activation of a hook and an SAE site (latent x neuron products, sparse
    latent pairs) over four batches on ``device``."""
    from actscope.pipeline import sampling
    from actscope.pipeline.coactivation import RunningCoactivation
    from actscope.pipeline.worker import Batch
    from actscope.storage.spec import JobSpec

    rng = np.random.default_rng(6)
    hook = torch.from_numpy(rng.normal(size=(512, 24)).astype(np.float32))
    latents = torch.from_numpy(((rng.random((512, 300)) < 0.03) * rng.normal(1.0, 1.0, (512, 300))).astype(np.float32))
    counted = torch.from_numpy(rng.random(512) < 0.95)
    spec = JobSpec.from_dict({"model": "m", "dataset": {"path": "text"}, "hooks": ["h"], "store": "s", "statistics": ["coactivation"],
                              "saes": [{"name": "lat", "path": "sae", "hook": "h"}], "coactivation": {"stride": 2, "hooks": ["h", "lat"]}})
    dev = torch.device(device)
    running = RunningCoactivation(spec, {"h": 24, "lat": 300}, dev)
    for b0 in range(0, 512, 128):
        span = slice(b0, b0 + 128)
        index = torch.arange(b0, b0 + 128, device=dev)
        running.update({"h": hook[span].to(dev), "lat": latents[span].to(dev)}, Batch(
            first=b0, counted=counted[span].to(dev), global_index=index, token_ids=index, docs=index, priority=sampling.priority(index, spec.seed)))
    return running.result()


def test_latent_coactivation_on_cuda_equals_the_cpu_and_itself():
    """The same co-activation state on both devices (counts and meetings identical, float32
    co-moments to 1e-4), and bit for bit the same on a second GPU run (no atomics in its sums)."""
    cpu, gpu, again = _latent_coactivation("cpu"), _latent_coactivation("cuda"), _latent_coactivation("cuda")
    assert set(cpu) == set(gpu) and "pairs.1.1.key" in cpu
    for name, expected in cpu.items():
        np.testing.assert_array_equal(again[name], gpu[name], err_msg=name)
        if np.issubdtype(expected.dtype, np.floating):
            np.testing.assert_allclose(gpu[name], expected, rtol=1e-4, atol=1e-4, err_msg=name)
        else:
            np.testing.assert_array_equal(gpu[name], expected, err_msg=name)
