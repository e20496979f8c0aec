"""Tokenize a corpus and pack it into fixed-length sequences, deterministically.

Documents are read in order (streaming, so a corpus larger than memory is fine), tokenized without
special tokens, and laid end to end with the framing's separator after each one. Each sequence is
``prefix + body + suffix`` (``[BOS] body`` for decoders, ``[CLS] body [SEP]`` for encoders); the
last sequence is padded. Every position keeps its provenance: document id, index in the document,
and kind (text, special, padding).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np

from pipeline.model import Framing
from storage.errors import CorpusError
from storage.spec import DatasetSpec, JobSpec
from storage.store import PAD, SPECIAL, TEXT, Store

_TOKENIZE_BATCH = 256


def read_documents(dataset: DatasetSpec) -> Iterator[str]:
    """The corpus's documents, in order, streamed with ``datasets``."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        stream = datasets.load_dataset(
            dataset.path,
            name=dataset.name,
            data_files=dataset.data_files,
            split=dataset.split,
            revision=dataset.revision,
            streaming=True,
        )
        first = next(iter(stream), None)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise CorpusError(f"dataset: cannot read {dataset.path} {dataset.data_files or ''}: {err}") from None
    except datasets.exceptions.DatasetNotFoundError as err:
        raise CorpusError(f"dataset: {err}") from None
    if first is None:
        raise CorpusError(f"dataset: {dataset.path} {dataset.data_files or ''} has no documents.")
    if dataset.text_column not in first:
        raise CorpusError(
            f"dataset.text_column: no column {dataset.text_column!r}; the corpus has columns "
            f"{', '.join(first)}."
        )
    for row in itertools.chain([first], stream.skip(1)):
        text = row[dataset.text_column]
        yield "" if text is None else str(text)


def _token_stream(documents: Iterable[str], tokenizer, framing: Framing, max_tokens: int | None):
    """Yield (token ids, doc id, first doc_pos, kinds) per document, separator included."""
    budget = max_tokens if max_tokens is not None else float("inf")
    doc_id = 0
    batches = iter(lambda: list(itertools.islice(documents, _TOKENIZE_BATCH)), [])
    for batch in batches:
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            if not ids:
                doc_id += 1
                continue
            ids = list(ids) + list(framing.separator)
            kinds = [TEXT] * (len(ids) - len(framing.separator)) + [SPECIAL] * len(framing.separator)
            if len(ids) >= budget:
                ids, kinds = ids[: int(budget)], kinds[: int(budget)]
            yield np.asarray(ids, dtype=np.int64), doc_id, np.asarray(kinds, dtype=np.uint8)
            budget -= len(ids)
            doc_id += 1
            if budget <= 0:
                return


def pack_sequences(
    documents: Iterable[str], tokenizer, framing: Framing, context_length: int, max_tokens: int | None, block: int
) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of ``block`` packed sequences (the last one shorter), as arrays [n, context_length]."""
    body_len = context_length - len(framing.prefix) - len(framing.suffix)
    if body_len <= 0:
        raise CorpusError(f"context_length: {context_length} leaves no room for text after the special tokens.")
    documents = iter(documents)
    pieces: list[tuple[np.ndarray, ...]] = []
    buffered = 0
    rows: list[tuple[np.ndarray, ...]] = []
    for ids, doc_id, kinds in _token_stream(documents, tokenizer, framing, max_tokens):
        pieces.append((ids, np.full(len(ids), doc_id), np.arange(len(ids)), kinds))
        buffered += len(ids)
        while buffered >= body_len:
            body, pieces = _take(pieces, body_len)
            buffered -= body_len
            rows.append(_frame(body, framing, context_length))
            if len(rows) == block:
                yield _stack(rows)
                rows = []
    if buffered:
        body, _ = _take(pieces, buffered)
        rows.append(_frame(body, framing, context_length))
    if rows:
        yield _stack(rows)


def _take(pieces, n):
    """Split the first ``n`` positions off a list of column tuples."""
    taken, rest, need = [], list(pieces), n
    while need:
        head = rest.pop(0)
        if len(head[0]) <= need:
            taken.append(head)
            need -= len(head[0])
        else:
            taken.append(tuple(col[:need] for col in head))
            rest.insert(0, tuple(col[need:] for col in head))
            need = 0
    return tuple(np.concatenate(cols) for cols in zip(*taken)), rest


def _frame(body, framing: Framing, context_length: int):
    ids, doc_ids, doc_pos, kinds = body
    n_pre, n_suf = len(framing.prefix), len(framing.suffix)
    n_pad = context_length - n_pre - len(ids) - n_suf
    first_doc, last_doc = doc_ids[0], doc_ids[-1]
    return (
        np.concatenate([framing.prefix, ids, framing.suffix, [framing.pad] * n_pad]).astype(np.int32),
        np.concatenate([[first_doc] * n_pre, doc_ids, [last_doc] * (n_suf + n_pad)]).astype(np.int64),
        np.concatenate([[0] * n_pre, doc_pos, [0] * (n_suf + n_pad)]).astype(np.int32),
        np.concatenate([[SPECIAL] * n_pre, kinds, [SPECIAL] * n_suf, [PAD] * n_pad]).astype(np.uint8),
    )


def _stack(rows) -> dict[str, np.ndarray]:
    names = ("tokens", "doc_ids", "doc_pos", "kinds")
    return {name: np.stack([row[i] for row in rows]) for i, name in enumerate(names)}


def check_corpus(dataset: DatasetSpec, tokenizer, framing: Framing) -> None:
    """Fail early, before any store is touched, if the corpus is unreadable or has no tokens."""
    for _ in _token_stream(read_documents(dataset), tokenizer, framing, max_tokens=None):
        return
    raise CorpusError(f"dataset: the corpus {dataset.path} {dataset.data_files or ''} yields no tokens (every document is empty).")


def tokenize_corpus(store: Store, spec: JobSpec, tokenizer, framing: Framing, progress=None) -> int:
    """Write the packed corpus into the store and return the number of sequences."""
    store.reset_token_arrays()
    n_seq = 0
    documents = read_documents(spec.dataset)
    for block in pack_sequences(
        documents, tokenizer, framing, spec.context_length, spec.dataset.max_tokens, spec.shard_size
    ):
        store.append_tokens(block)
        n_seq += len(block["tokens"])
        if progress is not None:
            progress(n_seq * spec.context_length)
    if n_seq == 0:
        raise CorpusError(f"dataset: the corpus {spec.dataset.path} {spec.dataset.data_files or ''} yielded no tokens.")
    store.update_status(tokenized=True, n_seq=n_seq)
    return n_seq
