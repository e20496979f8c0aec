"""Packing: deterministic, lossless, with provenance for every position."""

from __future__ import annotations

import numpy as np
from transformers import AutoTokenizer

from actscope.pipeline.corpus import batched, encode_here, pack_sequences
from actscope.pipeline.model import Framing
from actscope.storage.store import PAD, SPECIAL, TEXT
from tests.conftest import corpus_documents


def _pack(tokenizer, docs, ctx=32, max_tokens=None, block=7):
    framing = Framing.from_tokenizer(tokenizer)
    blocks = list(pack_sequences(encode_here(batched(docs, 16), tokenizer), framing, ctx, max_tokens, block))
    return framing, {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def test_text_tokens_in_order_are_the_documents(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    docs = corpus_documents()[:60]
    framing, packed = _pack(tokenizer, docs)
    assert framing.prefix == (tokenizer.bos_token_id,)
    text = packed["kinds"] == TEXT
    ids, doc_ids, doc_pos = packed["tokens"][text], packed["doc_ids"][text], packed["doc_pos"][text]
    for doc_id, doc in enumerate(docs):
        expected = tokenizer(doc, add_special_tokens=False)["input_ids"]
        mine = doc_ids == doc_id
        assert ids[mine].tolist() == expected
        assert doc_pos[mine].tolist() == list(range(len(expected)))
    assert (packed["tokens"][:, 0] == tokenizer.bos_token_id).all()
    assert (packed["kinds"][:, 0] == SPECIAL).all()


def test_padding_only_at_the_end_and_max_tokens(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    _, packed = _pack(tokenizer, corpus_documents(), max_tokens=1000)
    non_special_body = (packed["kinds"] != SPECIAL).sum() - (packed["kinds"] == PAD).sum()
    separators = ((packed["kinds"] == SPECIAL)[:, 1:]).sum()
    assert non_special_body + separators == 1000
    pads = np.argwhere(packed["kinds"] == PAD)
    assert (pads[:, 0] == len(packed["kinds"]) - 1).all()


def test_packing_is_deterministic(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    a = _pack(tokenizer, corpus_documents(), block=3)[1]
    b = _pack(tokenizer, corpus_documents(), block=64)[1]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_encoder_framing(minilm):
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    framing, packed = _pack(tokenizer, corpus_documents()[:20], ctx=16)
    assert framing.prefix == (tokenizer.cls_token_id,) and framing.suffix == (tokenizer.sep_token_id,)
    full = packed["kinds"][:-1]
    assert (packed["tokens"][:-1, -1] == tokenizer.sep_token_id).all() and (full[:, -1] == SPECIAL).all()


def test_text_columns_must_be_text(tmp_path):
    """A Parquet column of bytes is decoded as UTF-8 (bytes that are not UTF-8 are refused by
    name); a column of lists or structs is refused, never indexed as its Python repr."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from actscope.pipeline.corpus import read_batches
    from actscope.storage.errors import CorpusError
    from actscope.storage.spec import DatasetSpec

    def batches(name: str, column: pa.Array) -> list[list[str]]:
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"text": column}), path)
        return list(read_batches(DatasetSpec(path="parquet", data_files=[str(path)])))

    assert batches("binary", pa.array([b"1. Intro caf\xc3\xa9", None], pa.binary())) == [["1. Intro café", ""]]
    for name, column, needle in [
        ("latin1", pa.array([b"caf\xe9"], pa.binary()), "holds bytes that are not UTF-8"),
        ("list", pa.array([["1.", "Intro"]]), "holds list values, not text"),
        ("struct", pa.array([{"title": "Intro"}]), "holds dict values, not text"),
    ]:
        with pytest.raises(CorpusError, match=needle):
            batches(name, column)


def test_a_long_document_is_cut_to_what_max_tokens_can_use(tiny_model):
    """A document far longer than ``max_tokens`` needs is cut before it is encoded, and the cut
    changes none of the tokens kept: the first ``max_tokens`` tokens are those of the whole
    document."""
    from actscope.pipeline.corpus import document_chars

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    document = " ".join(corpus_documents()) * 20
    limit = document_chars(tokenizer, 300)
    assert limit < len(document) // 10
    whole = tokenizer(document, add_special_tokens=False)["input_ids"]
    cut = tokenizer(document[:limit], add_special_tokens=False)["input_ids"]
    assert len(cut) >= 300 and cut[:300] == whole[:300]
