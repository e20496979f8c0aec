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
