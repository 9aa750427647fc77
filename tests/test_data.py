"""The training data: corpus files -> documents -> tokens, and the batches read from them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from train.data import DataConfig, TokenBatches, documents, prepare


def _corpus(tmp_path, n=300):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "mixture", "expert", "router", "token"]
    root = tmp_path / "corpus"
    root.mkdir()
    texts = [" ".join(rng.choice(words, 40)) for _ in range(n)]
    with (root / "part0.jsonl").open("w") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"id": i, "text": t}) + "\n")
            if i % 50 == 0:
                fh.write("\n")  # blank lines are skipped
    (root / "notes.txt").write_text("a plain text file, read whole\n")
    return root, texts


def test_jsonl_records_are_documents_and_their_json_never_reaches_the_tokens(tmp_path):
    root, texts = _corpus(tmp_path)
    assert documents(root / "part0.jsonl", "text") == texts
    assert documents(root / "part0.jsonl", None)[0].startswith('{"id": 0')
    cfg = DataConfig(path=str(root), vocab_size=300, seq_len=32, batch_size=4,
                     cache_dir=str(tmp_path / "cache"))
    folder = prepare(cfg, log=lambda *a: None)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    meta = json.loads((folder / "meta.json").read_text())
    ids = np.fromfile(folder / "tokens.bin", dtype=meta["dtype"])
    text = tok.decode(ids.tolist(), skip_special_tokens=False)
    assert '"text"' not in text and '"id"' not in text
    assert text.count("<|endoftext|>") == len(texts) + 1  # one per record and the .txt file
    assert TokenBatches(folder, cfg).batch(0).shape == (4, 33)


@pytest.mark.parametrize("line,message", [
    ('{"content": "no text field"}', "no string field 'text'"),
    ("not json at all", "not a JSON line"),
    ('["a", "list"]', "no string field 'text'"),
])
def test_a_bad_jsonl_line_is_named(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        documents(p, "text")
    assert f"{p}:2" in str(e.value) and "data.text_field" in str(e.value)


def test_another_text_field(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"content": "one"}\n{"content": "two"}\n')
    assert documents(p, "content") == ["one", "two"]
