"""Tokenize a corpus and pack it into fixed-length sequences, deterministically.

Documents are read in order (streaming, so a corpus larger than memory is fine) in batches, each
batch is encoded without special tokens (``encode``: anywhere, on a CPU task of the cluster or
here), and the encoded batches are packed in order: documents laid end to end with the framing's
separator after each one, cut into sequences of ``prefix + body + suffix`` (``[BOS] body`` for
decoders, ``[CLS] body [SEP]`` for encoders); the last sequence is padded. Every position keeps its
provenance: document id (its index in the corpus), index in the document, and kind (text, special,
padding). Packing is vectorised over a whole batch, so it keeps up with many encoding tasks.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from actscope.pipeline.model import Framing, load_tokenizer
from actscope.storage.errors import CorpusError, cause
from actscope.storage.spec import DatasetSpec, JobSpec
from actscope.storage.store import PAD, SPECIAL, TEXT, Store

DOCUMENTS_PER_BATCH = 1024  # one encoding task's work: ~1 s of one core for web-sized documents

# One batch encoded: its documents' token ids end to end (int32) and their offsets (n + 1, int64).
Encoded = tuple[np.ndarray, np.ndarray]
Encoder = Callable[[Iterator[list[str]]], Iterator[Encoded]]
COLUMNS = tuple(Store.TOKEN_ARRAYS)  # the packed columns, in the order _positions and _frame give them


def document_chars(tokenizer, max_tokens: int | None) -> int | None:
    """The characters of a document that ``max_tokens`` tokens can come from: no token stands for
    more characters than its vocabulary entry has (byte-level pieces are bytes, ``##``/``▁``
    pieces carry their marks), so a document cut there encodes to the same first ``max_tokens``
    tokens, and a 50 MB document costs the encoder what ``max_tokens`` can use. (A WordPiece
    ``[UNK]`` for a word longer than the longest entry is the exception.) None: no limit."""
    if not max_tokens:
        return None
    longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1)
    return max_tokens * max(longest, 1) + 1


def _text(value, column: str) -> str:
    """A document's text: strings as they are, bytes decoded as UTF-8, None as empty; anything
    else is not text (a list's or a struct's repr would be indexed as if it were)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise CorpusError(f"dataset.text_column: column {column!r} holds bytes that are not UTF-8 text ({err.reason} at byte {err.start}).") from None
    raise CorpusError(f"dataset.text_column: column {column!r} holds {type(value).__name__} values, not text; give a column of strings.")


def read_batches(dataset: DatasetSpec, size: int | None = None, max_chars: int | None = None) -> Iterator[list[str]]:
    """The corpus's documents, in order, in lists of ``size``, streamed with ``datasets``; each
    cut to ``max_chars`` (``document_chars``)."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    size = size or DOCUMENTS_PER_BATCH
    where = f"{dataset.path} {dataset.data_files or ''}".strip()
    try:
        stream = datasets.load_dataset(
            dataset.path,
            name=dataset.name,
            data_files=dataset.data_files,
            split=dataset.split,
            revision=dataset.revision,
            streaming=True,
        )
        batches = stream.iter(batch_size=size)
        first = next(batches, None)
    except Exception as err:  # noqa: BLE001 - datasets' loaders fail in many ways (missing files, bad JSON, no network)
        raise CorpusError(f"dataset: cannot read {where}: {cause(err)}") from None
    if first is None:
        raise CorpusError(f"dataset: {where} has no documents.")
    if dataset.text_column not in first:
        raise CorpusError(
            f"dataset.text_column: no column {dataset.text_column!r}; the corpus has columns "
            f"{', '.join(map(str, first))}."
        )
    batch = first
    while batch is not None:
        yield [_text(text, dataset.text_column)[:max_chars] for text in batch[dataset.text_column]]
        try:
            batch = next(batches, None)
        except Exception as err:  # noqa: BLE001 - a later file can be malformed too
            raise CorpusError(f"dataset: cannot read {where}: {cause(err)}") from None


def batched(documents: Iterable[str], size: int | None = None) -> Iterator[list[str]]:
    """Documents already in memory, in the batches ``read_batches`` would give."""
    documents = iter(documents)
    return iter(lambda: list(itertools.islice(documents, size or DOCUMENTS_PER_BATCH)), [])


def encode(tokenizer, texts: list[str]) -> Encoded:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(doc) for doc in ids], out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def encode_here(batches: Iterable[list[str]], tokenizer) -> Iterator[Encoded]:
    return (encode(tokenizer, texts) for texts in batches)


@functools.cache
def _tokenizer(model: str, revision: str | None):
    return load_tokenizer(model, revision)


def encode_task(model: str, revision: str | None, texts: list[str]) -> Encoded:
    """One encoding task, on any machine: the tokenizer is loaded once per process."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a task has one core
    return encode(_tokenizer(model, revision), texts)


def _positions(encoded: Encoded, first_doc: int, framing: Framing) -> tuple[np.ndarray, ...]:
    """A batch as the stream of positions to pack: each non-empty document, then the separator."""
    flat, offsets = encoded
    lengths = np.diff(offsets)
    separator = np.asarray(framing.separator, dtype=np.int32)
    extended = lengths + len(separator) * (lengths > 0)
    starts = np.cumsum(extended) - extended
    doc_ids = np.repeat(np.arange(first_doc, first_doc + len(lengths), dtype=np.int64), extended)
    doc_pos = (np.arange(len(doc_ids)) - np.repeat(starts, extended)).astype(np.int32)
    is_text = doc_pos < np.repeat(lengths, extended)
    tokens = np.empty(len(doc_ids), dtype=np.int32)
    tokens[is_text] = flat
    tokens[~is_text] = np.tile(separator, int((lengths > 0).sum()))
    kinds = np.where(is_text, TEXT, SPECIAL).astype(np.uint8)
    return tokens, doc_ids, doc_pos, kinds


def _frame(body: tuple[np.ndarray, ...], framing: Framing, context_length: int) -> tuple[np.ndarray, ...]:
    """Rows of body positions [n, L] framed into sequences [n, context_length], padded after L."""
    ids, doc_ids, doc_pos, kinds = body
    n, length = ids.shape
    n_pre, n_suf = len(framing.prefix), len(framing.suffix)
    n_pad = context_length - n_pre - length - n_suf

    def fill(width, value, dtype):
        return np.broadcast_to(np.asarray(value, dtype=dtype), (n, width))

    tail = n_suf + n_pad
    return (
        np.hstack([fill(n_pre, framing.prefix, np.int32), ids, fill(n_suf, framing.suffix, np.int32), fill(n_pad, framing.pad, np.int32)]),
        np.hstack([np.repeat(doc_ids[:, :1], n_pre, axis=1), doc_ids, np.repeat(doc_ids[:, -1:], tail, axis=1)]),
        np.hstack([fill(n_pre, 0, np.int32), doc_pos, fill(tail, 0, np.int32)]),
        np.hstack([fill(n_pre, SPECIAL, np.uint8), kinds, fill(n_suf, SPECIAL, np.uint8), fill(n_pad, PAD, np.uint8)]),
    )


def pack_sequences(
    encoded: Iterable[Encoded], framing: Framing, context_length: int, max_tokens: int | None, block: int
) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of ``block`` packed sequences (the last one shorter), as arrays [n, context_length].
    ``max_tokens`` counts the body positions (text and separators) packed."""
    body_len = context_length - len(framing.prefix) - len(framing.suffix)
    if body_len <= 0:
        raise CorpusError(f"context_length: {context_length} leaves no room for text after the special tokens.")
    budget = max_tokens if max_tokens is not None else np.inf
    carry = _positions((np.zeros(0, np.int32), np.zeros(1, np.int64)), 0, framing)  # not yet a full row
    rows: list[tuple[np.ndarray, ...]] = []  # framed, not yet yielded
    n_rows, doc = 0, 0
    for batch in encoded:
        stream = _positions(batch, doc, framing)
        doc += len(batch[1]) - 1
        if len(stream[0]) >= budget:
            stream = tuple(col[: int(budget)] for col in stream)
        budget -= len(stream[0])
        stream = tuple(np.concatenate(pair) for pair in zip(carry, stream))
        full = len(stream[0]) // body_len * body_len
        carry = tuple(col[full:] for col in stream)
        if full:
            rows.append(_frame(tuple(col[:full].reshape(-1, body_len) for col in stream), framing, context_length))
            n_rows += full // body_len
        if n_rows >= block:
            yield from _blocks(rows, block, n_rows // block * block)
            n_rows %= block
        if budget <= 0:
            break
    if len(carry[0]):
        rows.append(_frame(tuple(col[None, :] for col in carry), framing, context_length))
        n_rows += 1
    yield from _blocks(rows, block, n_rows)


def _blocks(rows: list[tuple[np.ndarray, ...]], block: int, n: int) -> Iterator[dict[str, np.ndarray]]:
    """Yield the first ``n`` framed rows in blocks of ``block`` (the last may be shorter) and
    leave the rest in ``rows``."""
    if not rows:
        return
    stacked = tuple(np.concatenate(cols) for cols in zip(*rows))
    rows[:] = [tuple(col[n:] for col in stacked)]
    for i in range(0, n, block):
        yield dict(zip(COLUMNS, (col[i : min(i + block, n)] for col in stacked)))


def check_corpus(dataset: DatasetSpec, tokenizer) -> None:
    """Fail early, before any store is touched, if the corpus is unreadable or has no tokens."""
    for texts in read_batches(dataset, max_chars=document_chars(tokenizer, dataset.max_tokens)):
        if len(encode(tokenizer, texts)[0]):
            return
    raise CorpusError(f"dataset: the corpus {dataset.path} {dataset.data_files or ''} yields no tokens (every document is empty).")


def tokenize_corpus(store: Store, spec: JobSpec, framing: Framing, encoder: Encoder, progress=None, written=None,
                    max_chars: int | None = None) -> int:
    """Write the packed corpus into the store and return the number of sequences. ``encoder``
    turns batches of documents into encoded batches, in order (``encode_here``, or tasks); ``progress``
    is called with the tokens each block adds, ``written`` with the number of sequences in the
    store once a block's write is complete (workers may read those while the rest is written);
    ``max_chars``: where each document is cut (``document_chars``)."""
    store.reset_token_arrays()
    n_seq = 0
    encoded = encoder(read_batches(spec.dataset, max_chars=max_chars))

    # Appends run in order on one writer thread, overlapped with reading, packing and waiting for
    # encoded batches here; at most two blocks wait to be written.
    def append(block: dict[str, np.ndarray], end: int) -> None:
        store.append_tokens(block)
        if written is not None:
            written(end)  # on the writer thread, in order: the sequences up to ``end`` are final

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-writer") as writer:
        writes: deque = deque()
        for block in pack_sequences(encoded, framing, spec.context_length, spec.dataset.max_tokens, spec.shard_size):
            n_seq += len(block["tokens"])
            writes.append(writer.submit(append, block, n_seq))
            if len(writes) > 2:
                writes.popleft().result()
            if progress is not None:
                progress(len(block["tokens"]) * spec.context_length)  # tokens added
        for write in writes:
            write.result()
    if n_seq == 0:
        raise CorpusError(f"dataset: the corpus {spec.dataset.path} {spec.dataset.data_files or ''} yielded no tokens.")
    return n_seq  # the caller marks the store tokenized once everything sized by n_seq exists
