"""Local data of the device runtime: formatting, tokenisation, label masking, truncation, batching, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from device_runtime.data import (
    IGNORE_INDEX,
    LocalDataset,
    TextEncoder,
    collate,
    format_example,
    read_jsonl,
    split_train_eval,
    truncate_middle,
)
from device_runtime.errors import DataError

WORDS = "Article : Topic the match team won market shares rose sport business w0 w1 w2 w3 w4 w5 w6 w7 w8 w9".split()


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A WordLevel tokenizer: <pad>=0, <unk>=1, then WORDS in order (Article=2, :=3, Topic=4, ...)."""
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def ids(*words):
    return [WORDS.index(w) + 2 for w in words]


def test_format_example_classification_and_prompt_completion():
    assert format_example({"text": "the match", "label": "sport"}) == ("Article: the match\nTopic:", " sport")
    assert format_example({"text": "x", "label": 3}, template="Q {text} A") == ("Q x A", " 3")
    assert format_example({"prompt": "p", "completion": " c"}) == ("p", " c")
    for bad in ({"text": "x"}, {"prompt": "p", "completion": "  "}, {"text": 5, "label": "a"}, ["x"]):
        with pytest.raises(DataError):
            format_example(bad)


def test_encode_masks_prompt_tokens(tokenizer_file):
    encoder = TextEncoder(tokenizer_file, seq_len=32)
    input_ids, labels = encoder.encode(*format_example({"text": "the match", "label": "sport"}))
    prompt = ids("Article", ":", "the", "match", "Topic", ":")
    assert input_ids == prompt + ids("sport")
    assert labels == [IGNORE_INDEX] * len(prompt) + ids("sport")


def test_long_prompt_is_truncated_in_the_middle_and_completion_fits(tokenizer_file):
    encoder = TextEncoder(tokenizer_file, seq_len=8, keep_tail=3)
    text = " ".join(f"w{i}" for i in range(10))
    input_ids, labels = encoder.encode(*format_example({"text": text, "label": "sport"}))
    # budget 7 prompt tokens: head "Article : w0 w1" + tail "w9 Topic :", then the completion
    assert input_ids == ids("Article", ":", "w0", "w1", "w9", "Topic", ":", "sport")
    assert labels[-1] == ids("sport")[0] and labels[:-1] == [IGNORE_INDEX] * 7
    # a completion longer than seq_len keeps its start and one prompt token before it
    input_ids, labels = encoder.encode("the", " " + " ".join(f"w{i}" for i in range(10)))
    assert len(input_ids) == 8 and input_ids[0] == ids("the")[0] and labels[1:] == ids(*[f"w{i}" for i in range(7)])


def test_truncate_middle_edges():
    assert truncate_middle([1, 2, 3], 5, 2) == [1, 2, 3]
    assert truncate_middle([1, 2, 3, 4, 5], 3, 2) == [1, 4, 5]
    assert truncate_middle([1, 2, 3, 4, 5], 1, 4) == [1]
    assert truncate_middle([1, 2, 3, 4, 5], 2, 0) == [1, 2]


def test_collate_pads_right_with_masked_labels():
    batch = collate([([5, 6, 7], [-100, -100, 7]), ([8, 9], [-100, 9])], pad_id=0)
    np.testing.assert_array_equal(batch.input_ids, [[5, 6, 7], [8, 9, 0]])
    np.testing.assert_array_equal(batch.attention_mask, [[1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(batch.labels, [[-100, -100, 7], [-100, 9, -100]])
    assert batch.input_ids.dtype == batch.labels.dtype == batch.attention_mask.dtype == np.int64
    assert (batch.num_examples, batch.num_tokens) == (2, 5)
    assert collate([([5], [5])], pad_id=0, pad_to=4).input_ids.shape == (1, 4)
    with pytest.raises(DataError):
        collate([([1, 2, 3], [1, 2, 3])], pad_id=0, pad_to=2)


def test_split_is_deterministic_and_disjoint():
    records = list(range(20))
    train, held = split_train_eval(records, eval_fraction=0.25, seed=3)
    assert (train, held) == split_train_eval(records, eval_fraction=0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == records
    assert split_train_eval(records, eval_fraction=0.25, seed=4) != (train, held)
    assert split_train_eval([1], eval_fraction=0.5) == ([1], [])


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_line_names_its_number(tmp_path, tokenizer_file):
    good = json.dumps({"text": "the match", "label": "sport"})
    with pytest.raises(DataError, match=r":3: not valid JSON"):
        read_jsonl(write_lines(tmp_path / "a.jsonl", [good, "", "{oops"]))
    with pytest.raises(DataError, match=r":2: expected a JSON object"):
        read_jsonl(write_lines(tmp_path / "b.jsonl", [good, "[1, 2]"]))
    with pytest.raises(DataError, match=r":2: record needs"):
        LocalDataset.from_jsonl(write_lines(tmp_path / "c.jsonl", [good, '{"text": "x"}']), tokenizer_file, seq_len=8)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_dataset_batches(tmp_path, tokenizer_file):
    lines = [
        json.dumps(
            {"text": "the match team" if i % 2 else "market shares rose", "label": "sport" if i % 2 else "business"}
        )
        for i in range(10)
    ]
    dataset = LocalDataset.from_jsonl(
        write_lines(tmp_path / "d.jsonl", lines), tokenizer_file, seq_len=16, eval_fraction=0.2, seed=1
    )
    assert (len(dataset.train), len(dataset.eval)) == (8, 2)
    epoch = list(dataset.train_batches(3, epochs=1))
    assert [b.num_examples for b in epoch] == [3, 3, 2]
    for batch in epoch:
        assert batch.input_ids.shape == batch.labels.shape == (batch.num_examples, 8)  # Article : w w w Topic : label
        # exactly one target (the label word) per sequence, at its last real token
        assert ((batch.labels != IGNORE_INDEX).sum(axis=1) == 1).all()
    first, again = next(dataset.train_batches(3)), next(dataset.train_batches(3))
    np.testing.assert_array_equal(first.input_ids, again.input_ids)
    assert sum(b.num_examples for b in dataset.eval_batches(4)) == 2
