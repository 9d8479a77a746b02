"""Tests for fastft_jax/data.py with a small byte-level BPE tokenizer built here."""

from __future__ import annotations

import os

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from convert.errors import ConfigError, DataError
from fastft_jax.data import (
    IGNORE_INDEX,
    BatchIterator,
    DataConfig,
    load_records,
    pack_first_fit,
    padded_length,
    prepare_datasets,
    render_text,
    split_eval,
    tokenize_dataset,
    trained_token_count,
    validate_fields,
)

WORDS = ("fever cough patient doctor heart blood pressure dose tablet pain chest lung kidney "
         "liver test result answer question think because therefore likely diagnosis").split()

SEED_TEMPLATE_YAML = """\
data:
  template: |
    Below is an instruction that describes a task, paired with an input that provides further context.
    Write a response that appropriately completes the request.
    Before answering, think carefully about the question and create a step-by-step chain of thoughts to ensure a logical and accurate response.

    ### Instruction:
    You are a medical expert with advanced knowledge in clinical reasoning, diagnostics, and treatment planning.
    Please answer the following medical question.

    ### Question:
    {Question}

    ### Response:
    <think>
    {Complex_CoT}
    </think>
    {Response}
  response_marker: "### Response:"
  train_on_responses_only: true
  max_seq_length: 512
"""

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORDS), SEED_TEMPLATE_YAML, "user assistant system"] * 3
    bpe.train_from_iterator(corpus, trainer)
    # Like Llama's tokenizer: a BOS in front of every encoded text.
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="<|im_end|>",
                                      pad_token="<pad>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@pytest.fixture
def rng():
    seed = int(os.environ.get("FASTFT_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"seed={seed} (rerun with FASTFT_TEST_SEED={seed})")
    return np.random.default_rng(seed)


def sentence(rng, low=2, high=12) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))


def medical_rows(rng, count):
    return [{"Question": sentence(rng), "Complex_CoT": sentence(rng), "Response": sentence(rng)}
            for _ in range(count)]


def seed_config(**overrides) -> DataConfig:
    values = yaml.safe_load(SEED_TEMPLATE_YAML)["data"]
    return DataConfig.from_dict({**values, **overrides})


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


# ------------------------------------------------------------------------------------ config


def test_config_from_yaml_keeps_the_seed_template():
    cfg = seed_config()
    assert cfg.template.startswith("Below is an instruction")
    assert cfg.template.endswith("</think>\n{Response}\n")
    assert cfg.response_marker == "### Response:" and cfg.train_on_responses_only


def test_config_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match="data.max_seq_len.*max_seq_length"):
        DataConfig.from_dict({"max_seq_len": 128})
    with pytest.raises(ConfigError, match="data.dataset_text_fild.*text_field"):
        DataConfig.from_dict({"dataset_text_fild": "text"})


def test_config_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"data.max_seq_length: expected int, got str"):
        DataConfig.from_dict({"max_seq_length": "2048"})
    with pytest.raises(ConfigError, match=r"data.packing: expected bool"):
        DataConfig.from_dict({"packing": 1})
    with pytest.raises(ConfigError, match="response_marker"):
        DataConfig.from_dict({"train_on_responses_only": True})
    assert DataConfig.from_dict({"eval_fraction": 0}).eval_fraction == 0.0


# ------------------------------------------------------------------------------------ loading


def test_load_jsonl_csv_parquet_json_and_directory(tmp_path, rng):
    rows = [{"text": sentence(rng), "id": str(i)} for i in range(int(rng.integers(3, 9)))]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    with open(tmp_path / "c.csv", "w", newline="") as handle:
        handle.write("text,id\n" + "".join(f"{r['text']},{r['id']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("a.jsonl", "b.json", "c.csv", "d.parquet"):
        assert load_records(tmp_path / name) == rows, name
    assert load_records(str(tmp_path)) == rows * 4


def test_load_hf_dataset_and_list(rng):
    import datasets

    rows = [{"text": sentence(rng)} for _ in range(5)]
    assert load_records(datasets.Dataset.from_list(rows)) == rows
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    assert load_records(splits, split="train") == rows
    with pytest.raises(DataError, match="'test'.*available splits: train"):
        load_records(splits, split="test")
    assert load_records(rows) == rows


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_records(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="empty"):
        load_records([])
    (tmp_path / "rows.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unknown extension '\.txt'"):
        load_records(tmp_path / "rows.txt")


def test_missing_field_names_available_fields(rng):
    rows = medical_rows(rng, 3)
    with pytest.raises(DataError, match=r"'text' is missing.*Question, Complex_CoT, Response"):
        validate_fields(rows, DataConfig())
    del rows[2]["Complex_CoT"]
    with pytest.raises(DataError, match="'Complex_CoT' is missing from row 2"):
        validate_fields(rows, seed_config())


def test_split_eval_is_seeded_and_disjoint(rng):
    rows = [{"text": str(i)} for i in range(int(rng.integers(20, 50)))]
    seed = int(rng.integers(1 << 30))
    train, evaluation = split_eval(rows, 0.2, seed)
    assert (train, evaluation) == split_eval(rows, 0.2, seed)
    assert len(evaluation) == round(len(rows) * 0.2)
    assert sorted(r["text"] for r in train + evaluation) == sorted(r["text"] for r in rows)


# ------------------------------------------------------------------------------------ tokenizing


def test_template_rendering(tokenizer, rng):
    row = medical_rows(rng, 1)[0]
    text = render_text(row, tokenizer, seed_config())
    assert f"### Question:\n{row['Question']}\n\n### Response:\n<think>\n{row['Complex_CoT']}\n" \
           f"</think>\n{row['Response']}\n" in text
    assert text.startswith("Below is an instruction that describes a task, paired with an input")


def test_full_text_labels_are_shifted_tokens_with_eos(tokenizer, rng):
    rows = [{"text": sentence(rng)} for _ in range(4)]
    data = tokenize_dataset(rows, tokenizer, DataConfig(max_seq_length=256), progress=False)
    for index, row in enumerate(rows):
        input_ids, _ = data.example(index)
        assert input_ids[0] == tokenizer.bos_token_id and input_ids[-1] == tokenizer.eos_token_id
        assert decode(tokenizer, input_ids[1:-1]) == row["text"]
        labels = data.labels(index)
        np.testing.assert_array_equal(labels[:-1], input_ids[1:])
        assert labels[-1] == IGNORE_INDEX
    assert data.stats.num_trained_tokens == int(data.lengths.sum()) - len(rows)


def test_responses_only_masks_the_prompt(tokenizer, rng):
    cfg = seed_config()
    rows = medical_rows(rng, 5)
    data = tokenize_dataset(rows, tokenizer, cfg, progress=False)
    assert data.stats.num_truncated == 0 and data.stats.num_fully_masked == 0
    # A response that quotes the marker is trained whole: only the first marker counts.
    rows[-1]["Response"] += " ### Response: " + sentence(rng)
    data = tokenize_dataset(rows, tokenizer, cfg, progress=False)
    for index, row in enumerate(rows):
        input_ids, loss_mask = data.example(index)
        labels = data.labels(index)
        first_trained = int(np.argmax(loss_mask))
        assert first_trained > 0 and loss_mask[first_trained:].all()
        # Everything up to and including the marker is untrained, everything after it trained.
        assert decode(tokenizer, input_ids[:first_trained]).endswith("### Response:")
        expected_response = f"\n<think>\n{row['Complex_CoT']}\n</think>\n{row['Response']}\n"
        assert decode(tokenizer, input_ids[first_trained:]) == expected_response + "<|im_end|>"
        assert (labels[:first_trained - 1] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(labels[first_trained - 1:-1], input_ids[first_trained:])
        assert labels[-1] == IGNORE_INDEX


def test_chat_masks_user_turns_and_trains_each_assistant_turn(tokenizer, rng):
    conversations = []
    for _ in range(3):
        turns = int(rng.integers(1, 4))
        messages = [{"role": "system", "content": sentence(rng)}]
        for _ in range(turns):
            messages += [{"role": "user", "content": sentence(rng)},
                         {"role": "assistant", "content": sentence(rng)}]
        conversations.append({"messages": messages})
    cfg = DataConfig(messages_field="messages", response_marker="<|im_start|>assistant\n",
                     train_on_responses_only=True, max_seq_length=1024)
    data = tokenize_dataset(conversations, tokenizer, cfg, progress=False)
    for index, row in enumerate(conversations):
        input_ids, loss_mask = data.example(index)
        # The template writes its own BOS; the tokenizer's is dropped, not doubled.
        assert input_ids[0] == tokenizer.bos_token_id and input_ids[1] != tokenizer.bos_token_id
        trained = decode(tokenizer, input_ids[loss_mask])
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert trained == "".join(reply + "<|im_end|>" for reply in replies)
        # Chat rows end with the template's own end of turn and newline, no extra EOS.
        assert decode(tokenizer, input_ids[-2:]) == "<|im_end|>\n"

    # Same masking with Unsloth's instruction_part style and ShareGPT rows.
    sharegpt = [{"conversations": [{"from": m["role"].replace("user", "human")
                                    .replace("assistant", "gpt"), "value": m["content"]}
                                   for m in row["messages"]]} for row in conversations]
    cfg = DataConfig(messages_field="conversations", response_marker="<|im_start|>assistant\n",
                     instruction_marker="<|im_start|>user\n", train_on_responses_only=True)
    sharegpt_data = tokenize_dataset(sharegpt, tokenizer, cfg, progress=False)
    np.testing.assert_array_equal(sharegpt_data.token_ids, data.token_ids)
    for index, row in enumerate(conversations):
        input_ids, loss_mask = sharegpt_data.example(index)
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        # Up to the next user header: the end-of-turn newline is trained too, except at the end.
        assert decode(tokenizer, input_ids[loss_mask]) == "<|im_end|>\n".join(replies) + "<|im_end|>\n"


def test_truncation_is_counted(tokenizer, rng):
    rows = [{"text": sentence(rng, 1, 40)} for _ in range(12)]
    full = tokenize_dataset(rows, tokenizer, DataConfig(max_seq_length=10_000), progress=False)
    limit = int(np.median(full.lengths))
    cut = tokenize_dataset(rows, tokenizer, DataConfig(max_seq_length=limit), progress=False)
    assert cut.stats.num_truncated == int((full.lengths > limit).sum()) > 0
    np.testing.assert_array_equal(cut.lengths, np.minimum(full.lengths, limit))
    for index in range(len(rows)):
        np.testing.assert_array_equal(cut.example(index)[0], full.example(index)[0][:limit])


def test_every_label_masked_is_an_error(tokenizer, rng):
    cfg = seed_config(response_marker="### Answer:")
    with pytest.raises(DataError, match="every label.*'### Answer:' never occurs"):
        tokenize_dataset(medical_rows(rng, 3), tokenizer, cfg, progress=False)
    # Rows without the marker are allowed while some row has one, and counted.
    rows = medical_rows(rng, 3)
    cfg = DataConfig(template="{Question}", response_marker="### Response:",
                     train_on_responses_only=True)
    with pytest.raises(DataError, match="never occurs in the 3 rendered"):
        tokenize_dataset(rows, tokenizer, cfg, progress=False)
    rows[1]["Question"] += " ### Response: " + sentence(rng)
    data = tokenize_dataset(rows, tokenizer, cfg, progress=False)
    assert data.stats.num_without_marker == data.stats.num_fully_masked == 2
    assert data.stats.num_trained_tokens == int(data.loss_mask.sum()) > 0


# ------------------------------------------------------------------------------------ batching


def tokenized_texts(tokenizer, rng, count, max_seq_length=64):
    rows = [{"text": sentence(rng, 1, 30)} for _ in range(count)]
    return tokenize_dataset(rows, tokenizer, DataConfig(max_seq_length=max_seq_length),
                            progress=False)


def segments_of(batch):
    """Every (input_ids, labels, positions) segment of a batch, keyed by row and segment id."""
    found = []
    for row in range(batch.input_ids.shape[0]):
        for segment in np.unique(batch.segment_ids[row]):
            if segment == 0:
                continue
            where = batch.segment_ids[row] == segment
            found.append((batch.input_ids[row, where], batch.labels[row, where],
                          batch.positions[row, where]))
    return found


@pytest.mark.parametrize("packing", [False, True])
def test_batches_hold_each_example_once_with_its_labels(tokenizer, rng, packing):
    data = tokenized_texts(tokenizer, rng, int(rng.integers(20, 40)))
    batch_size = int(rng.integers(2, 5))
    iterator = BatchIterator(data, batch_size, seq_len=64, packing=packing,
                             seed=int(rng.integers(1 << 30)))
    # Keyed by token ids: random texts can repeat, so `all_examples` keeps every copy for the
    # exactly-once check while the dict maps each distinct example to its labels.
    all_examples = [tuple(data.example(i)[0]) for i in range(len(data))]
    expected = {tuple(data.example(i)[0]): data.labels(i) for i in range(len(data))}
    seen = []
    trained = 0
    for batch in iterator.epoch_batches(0):
        assert batch.input_ids.shape == batch.labels.shape == (batch_size, batch.input_ids.shape[1])
        assert all(a.dtype == np.int32 for a in batch)
        trained += trained_token_count(batch)
        for input_ids, labels, positions in segments_of(batch):
            np.testing.assert_array_equal(labels, expected[tuple(input_ids)])
            np.testing.assert_array_equal(positions, np.arange(len(input_ids)))
            seen.append(tuple(input_ids))
        padding = batch.segment_ids == 0
        assert (batch.labels[padding] == IGNORE_INDEX).all()
        assert (batch.input_ids[padding] == data.pad_token_id).all()
        # Segments are numbered 1, 2, ... from the left with padding only at the end.
        for row in batch.segment_ids:
            real = row[row > 0]
            assert (np.diff(real) >= 0).all() and (np.diff(real) <= 1).all()
            assert len(real) == 0 or (real[0] == 1 and (row[len(real):] == 0).all())
    assert sorted(seen) == sorted(all_examples)
    assert trained == data.stats.num_trained_tokens


def test_packed_labels_never_cross_a_segment(tokenizer, rng):
    data = tokenized_texts(tokenizer, rng, 30)
    iterator = BatchIterator(data, 2, seq_len=64, packing=True, seed=int(rng.integers(1 << 30)))
    assert len(iterator.rows) < len(data)
    for batch in iterator.epoch_batches(0):
        boundary = batch.segment_ids[:, 1:] != batch.segment_ids[:, :-1]
        assert (batch.labels[:, :-1][boundary] == IGNORE_INDEX).all()
        assert (batch.labels[:, -1] == IGNORE_INDEX).all()
        assert batch.input_ids.shape[1] == 64


def test_first_fit_packing_fills_earliest_row(rng):
    capacity = int(rng.integers(20, 60))
    lengths = rng.integers(1, capacity + 1, size=int(rng.integers(30, 80)))
    rows = pack_first_fit(lengths, capacity)
    free = []
    placement = {example: r for r, row in enumerate(rows) for example in row}
    for example, length in enumerate(lengths):
        target = next((r for r, room in enumerate(free) if room >= length), len(free))
        assert placement[example] == target
        if target == len(free):
            free.append(capacity)
        free[target] -= length
    assert sorted(placement) == list(range(len(lengths)))


def test_padding_policies():
    assert padded_length(70, 2048, "bucket", None) == 128
    assert padded_length(3, 2048, "bucket", None) == 64
    assert padded_length(1500, 1000, "bucket", None) == 1000
    assert padded_length(70, 2048, "longest", 64) == 128
    assert padded_length(70, 2048, "max_length", None) == 2048
    with pytest.raises(ConfigError, match="padding"):
        padded_length(70, 2048, "dynamic", None)


def test_last_partial_batch_is_padded_to_shape(tokenizer, rng):
    count = 7
    data = tokenized_texts(tokenizer, rng, count)
    iterator = BatchIterator(data, 3, seq_len=64, padding="max_length", shuffle=False)
    batches = list(iterator.epoch_batches(0))
    assert iterator.steps_per_epoch == len(batches) == 3
    assert {b.input_ids.shape for b in batches} == {(3, 64)}
    last = batches[-1]
    assert (last.segment_ids[1:] == 0).all() and (last.labels[1:] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(last.input_ids[0, :data.lengths[6]], data.example(6)[0])


def test_shuffle_is_deterministic_and_resume_is_exact(tokenizer, rng):
    data = tokenized_texts(tokenizer, rng, int(rng.integers(11, 25)))
    seed = int(rng.integers(1 << 30))
    for packing in (False, True):
        make = lambda **kw: BatchIterator(data, 2, seq_len=64, packing=packing, seed=seed, **kw)  # noqa: E731
        reference = make()
        total = 2 * reference.steps_per_epoch + 3
        uninterrupted = [next(reference) for _ in range(total)]
        stop = int(rng.integers(1, total))
        first = make()
        for _ in range(stop):
            next(first)
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        # next() walks epoch 0, then epoch 1, ... in the order batch_at gives.
        steps = reference.steps_per_epoch
        assert reference.state_dict() == {"epoch": (total - 1) // steps,
                                          "step": (total - 1) % steps + 1}
        for index, batch in enumerate(uninterrupted):
            expected = reference.batch_at(index // steps, index % steps)
            for got_array, expected_array in zip(batch, expected):
                np.testing.assert_array_equal(got_array, expected_array)
        for expected in uninterrupted[stop:]:
            for got_array, expected_array in zip(next(resumed), expected):
                np.testing.assert_array_equal(got_array, expected_array)
    # Epochs are shuffled differently and a different seed gives a different order.
    iterator = BatchIterator(data, 2, seq_len=64, seed=seed)
    assert not np.array_equal(iterator.row_order(0), iterator.row_order(1))
    other = BatchIterator(data, 2, seq_len=64, seed=seed + 1)
    assert not np.array_equal(iterator.row_order(3), other.row_order(3))
    unshuffled = BatchIterator(data, 2, seq_len=64, shuffle=False)
    np.testing.assert_array_equal(unshuffled.row_order(5), np.arange(len(data)))


def test_batch_larger_than_dataset(tokenizer, rng):
    data = tokenized_texts(tokenizer, rng, 6)
    with pytest.raises(DataError, match="batch_size=7 is larger than the dataset: 6 examples"):
        BatchIterator(data, 7, seq_len=64)
    packed_rows = BatchIterator(data, 1, seq_len=64, packing=True).num_rows
    with pytest.raises(DataError, match=f"batch_size={packed_rows + 1} .* {packed_rows} packed "
                                        "rows .*6 examples"):
        BatchIterator(data, packed_rows + 1, seq_len=64, packing=True)


def test_prepare_datasets_from_file_with_eval_split(tokenizer, tmp_path, rng):
    rows = medical_rows(rng, 10)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = seed_config(path=str(tmp_path / "train.jsonl"), eval_fraction=0.3, packing=True)
    train, evaluation = prepare_datasets(cfg, tokenizer, seed=3, progress=False)
    assert (len(train), len(evaluation)) == (7, 3)
    iterator = BatchIterator.from_config(train, cfg, batch_size=1, seed=3)
    assert sum(trained_token_count(b) for b in iterator.epoch_batches(0)) == \
        train.stats.num_trained_tokens
