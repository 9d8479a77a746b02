"""The SFT data pipeline: load rows, render them to text, tokenize with a loss mask, and batch them
into fixed-shape numpy arrays for a jitted train step.

It mirrors TRL's SFTTrainer (`dataset_text_field`, `max_seq_length`, `packing`) and Unsloth's
`train_on_responses_only` (instruction and response markers), so a recipe carries over key for key.

Labels convention (what the trainer's loss expects): for a row of tokens t[0..S-1],

    labels[i] = t[i+1]  if the loss mask of token i+1 is set (and i+1 is in the same segment)
    labels[i] = -100    otherwise; the last position is always -100.

So the logits at position i are scored against labels[i] directly, with no shift in the loss:
this is the shift that HF models do inside `forward` (`logits[:, :-1]` against `labels[:, 1:]`),
done once here. The loss mask of a row's first token is never used, since nothing predicts it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Bool, Int32
from tqdm.auto import tqdm

from convert.errors import ConfigError, DataError
from fastft_jax.config_utils import dataclass_from_dict

IGNORE_INDEX = -100
SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")
PADDING_CHOICES = ("bucket", "longest", "max_length")
# Smallest bucket: below this a shorter row saves too little to be worth another compile.
MIN_BUCKET = 64
# ShareGPT rows ({"from": "human", "value": ...}) are mapped onto chat-template roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}


@dataclass(frozen=True)
class DataConfig:
    """The YAML `data:` section. Field names follow TRL's SFTConfig where one exists
    (`dataset_text_field` -> `text_field`, `max_seq_length`, `packing`) and Unsloth's
    `train_on_responses_only` (`response_part` -> `response_marker`,
    `instruction_part` -> `instruction_marker`).

    The text of a row comes from `messages_field` (chat rows rendered by the tokenizer's chat
    template) if set, else from `template` (`str.format_map(row)`, `{Field}` placeholders, literal
    braces doubled), else from `text_field`.
    """

    path: str | None = None
    split: str = "train"
    text_field: str | None = "text"
    template: str | None = None
    messages_field: str | None = None
    # Loss only on what follows this marker: its first occurrence for text and template rows;
    # every occurrence (every assistant turn) for chat rows.
    response_marker: str | None = None
    # Chat rows: an assistant turn ends where this marker (the user header) begins; if unset, it
    # ends after the tokenizer's eos_token (the end-of-turn token of Qwen/Llama-3 chat models).
    instruction_marker: str | None = None
    train_on_responses_only: bool = False
    # Text and template rows only: chat templates already close each turn with their own token.
    add_eos: bool = True
    max_seq_length: int = 2048
    packing: bool = False
    # "bucket" (default): pad a batch to its longest row rounded up to a power of two (at least
    # 64, at most max_seq_length). An HF user expects dynamic padding ("longest"), which does not
    # waste compute on short batches; but under jit each new shape is a new compile, and bucketing
    # bounds the shapes to about log2(max_seq_length / 64) + 1 while wasting < 2x on any batch.
    # "max_length": every batch is max_seq_length long (one compile). "longest": the batch's
    # longest row, rounded up to pad_to_multiple_of if set.
    padding: str = "bucket"
    pad_to_multiple_of: int | None = None
    shuffle: bool = True
    eval_path: str | None = None
    # Seeded split of an eval set off the train rows (the trainer's seed), like
    # `Dataset.train_test_split(test_size=...)`.
    eval_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.template is not None and self.messages_field is not None:
            raise ConfigError("data: set either `template` or `messages_field`, not both")
        if self.template is None and self.messages_field is None and self.text_field is None:
            raise ConfigError("data: set one of `text_field`, `template` or `messages_field`")
        if self.train_on_responses_only and not self.response_marker:
            raise ConfigError("data.train_on_responses_only needs `response_marker` (e.g. "
                              "'### Response:' or the chat template's assistant header)")
        if self.max_seq_length < 2:
            raise ConfigError(f"data.max_seq_length must be >= 2, got {self.max_seq_length}")
        if self.padding not in PADDING_CHOICES:
            raise ConfigError(f"data.padding must be one of {PADDING_CHOICES}, got {self.padding!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ConfigError(f"data.pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction > 0.0 and self.eval_path is not None:
            raise ConfigError("data: set either `eval_path` or `eval_fraction`, not both")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "data") -> DataConfig:
        """Build from a YAML mapping; an unknown key names the nearest valid one, a wrong type
        names the key and the expected type."""
        return dataclass_from_dict(cls, values, where)


# ----------------------------------------------------------------------------------------------
# Loading


def load_records(source: Any, split: str = "train") -> list[dict]:
    """Rows from a `datasets.Dataset`/`DatasetDict`, a list of dicts, or a local file or directory
    (.json, .jsonl, .csv, .parquet). Works offline; raises DataError before reading anything
    large if the path is missing or has an unknown extension."""
    if isinstance(source, (str, os.PathLike)):
        records = _read_path(Path(source))
        where = str(source)
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        records = list(source)
        where = "the given list"
        for index, row in enumerate(records):
            if not isinstance(row, Mapping):
                raise DataError(f"row {index} of the given list is a {type(row).__name__}, "
                                "expected a dict of fields")
    elif _is_dataset_dict(source):
        if split not in source:
            raise DataError(f"split {split!r} is not in the DatasetDict; available splits: "
                            f"{', '.join(source.keys())}")
        records = source[split].to_list()
        where = f"split {split!r}"
    elif hasattr(source, "to_list") and hasattr(source, "column_names"):
        records = source.to_list()
        where = "the given Dataset"
    else:
        raise DataError(f"cannot load rows from a {type(source).__name__}: pass a path, a list "
                        "of dicts or a datasets.Dataset")
    if not records:
        raise DataError(f"the dataset from {where} is empty (0 rows)")
    return records


def _is_dataset_dict(source: Any) -> bool:
    return type(source).__name__ in ("DatasetDict", "IterableDatasetDict") and isinstance(source, Mapping)


def _read_path(path: Path) -> list[dict]:
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUPPORTED_EXTENSIONS)
        if not files:
            raise DataError(f"directory {path} holds no {'/'.join(SUPPORTED_EXTENSIONS)} files")
    else:
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise DataError(f"data file {path}: unknown extension {path.suffix!r}; use one of "
                            f"{', '.join(SUPPORTED_EXTENSIONS)}")
        files = [path]
    records: list[dict] = []
    for file in files:
        records.extend(_read_file(file))
    return records


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path).to_pylist()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        # Like datasets' "json" loader, a .json file may hold a list of rows, a dict of columns,
        # or JSON lines.
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            return _checked_rows(parsed, path)
        if isinstance(parsed, dict):
            columns = {k: v for k, v in parsed.items() if isinstance(v, list)}
            if columns and len(columns) == len(parsed) and len({len(v) for v in columns.values()}) == 1:
                names = list(columns)
                return [dict(zip(names, values)) for values in zip(*columns.values())]
            return [parsed]
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
    return _checked_rows(rows, path)


def _checked_rows(rows: list, path: Path) -> list[dict]:
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {index} is a {type(row).__name__}, expected an object")
    return rows


def split_eval(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split of `fraction` of the rows (at least one) into an eval set."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in (0, 1) to split, got {fraction}")
    num_eval = max(1, round(len(records) * fraction))
    if num_eval >= len(records):
        raise DataError(f"eval_fraction={fraction} of {len(records)} rows leaves no train rows")
    order = np.random.default_rng(seed).permutation(len(records))
    eval_rows = sorted(order[:num_eval].tolist())
    train_rows = sorted(order[num_eval:].tolist())
    return [records[i] for i in train_rows], [records[i] for i in eval_rows]


# ----------------------------------------------------------------------------------------------
# Rendering


def template_fields(template: str) -> list[str]:
    """The row fields a `str.format` template reads (`{Question}` -> "Question")."""
    names = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is None:
            continue
        if field_name == "" or field_name.isdigit():
            raise ConfigError(f"data.template: positional placeholder {{{field_name}}}; name the "
                              "field, e.g. {Question}, and double literal braces: {{ }}")
        name = field_name.split(".")[0].split("[")[0]
        if name not in names:
            names.append(name)
    return names


def _needed_fields(cfg: DataConfig) -> list[str]:
    if cfg.messages_field is not None:
        return [cfg.messages_field]
    if cfg.template is not None:
        return template_fields(cfg.template)
    return [cfg.text_field]


def validate_fields(records: Sequence[Mapping], cfg: DataConfig) -> None:
    """Check, before any tokenizing, that every row holds the fields the config reads."""
    needed = _needed_fields(cfg)
    if not records:
        raise DataError("the dataset is empty (0 rows)")
    for index, row in enumerate(records):
        for name in needed:
            if name not in row:
                available = ", ".join(map(str, row.keys())) or "(none)"
                which = "row 0" if index == 0 else f"row {index}"
                raise DataError(f"field {name!r} is missing from {which}; available fields: "
                                f"{available}. Set data.text_field / data.template / "
                                "data.messages_field to match the dataset")
            if row[name] is None:
                raise DataError(f"row {index}: field {name!r} is null")
        if cfg.messages_field is not None:
            messages = row[cfg.messages_field]
            if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
                raise DataError(f"row {index}: field {cfg.messages_field!r} must be a list of "
                                "{'role': ..., 'content': ...} messages")
        elif cfg.template is None and not isinstance(row[cfg.text_field], str):
            raise DataError(f"row {index}: field {cfg.text_field!r} is a "
                            f"{type(row[cfg.text_field]).__name__}, expected a string")


def _standard_messages(messages: list[Mapping]) -> list[dict]:
    if messages and "role" not in messages[0] and "from" in messages[0]:
        return [{"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]}
                for m in messages]
    return [dict(m) for m in messages]


def render_text(row: Mapping, tokenizer: Any, cfg: DataConfig) -> str:
    """One row's training text, before the EOS is appended."""
    if cfg.messages_field is not None:
        return tokenizer.apply_chat_template(_standard_messages(row[cfg.messages_field]),
                                             tokenize=False)
    if cfg.template is not None:
        return cfg.template.format_map(row)
    return row[cfg.text_field]


def _trained_char_spans(text: str, cfg: DataConfig, end_of_turn: str | None) -> list[tuple[int, int]]:
    """Character spans of `text` that carry loss under train_on_responses_only."""
    marker = cfg.response_marker
    if cfg.messages_field is None:
        found = text.find(marker)
        return [] if found < 0 else [(found + len(marker), len(text))]
    spans = []
    start = text.find(marker)
    while start >= 0:
        body = start + len(marker)
        following = text.find(marker, body)
        end = len(text) if following < 0 else following
        if cfg.instruction_marker is not None:
            instruction = text.find(cfg.instruction_marker, body)
            if 0 <= instruction < end:
                end = instruction
        elif end_of_turn:
            turn_end = text.find(end_of_turn, body)
            if 0 <= turn_end < end:
                end = turn_end + len(end_of_turn)
        spans.append((body, end))
        start = following
    return spans


# ----------------------------------------------------------------------------------------------
# Tokenizing


@dataclass(frozen=True)
class TokenizationStats:
    num_examples: int
    num_truncated: int  # rows longer than max_seq_length, cut to it
    num_tokens: int
    num_trained_tokens: int  # labels != -100 over the dataset, unpacked
    num_without_marker: int  # rows whose text never holds the response marker
    num_fully_masked: int  # rows with no trained label at all (marker missing or truncated away)

    def __str__(self) -> str:
        text = (f"{self.num_examples} examples, {self.num_tokens} tokens, "
                f"{self.num_trained_tokens} trained, {self.num_truncated} truncated")
        if self.num_fully_masked:
            text += f", {self.num_fully_masked} with no trained token"
        return text


@dataclass(frozen=True)
class TokenizedDataset:
    """All examples' tokens in one flat array: example k is token_ids[offsets[k]:offsets[k+1]]."""

    token_ids: Int32[np.ndarray, "total"]
    loss_mask: Bool[np.ndarray, "total"]  # True where the token is trained (predicted with loss)
    offsets: Int32[np.ndarray, "examples_plus_1"]
    pad_token_id: int
    max_seq_length: int
    stats: TokenizationStats

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, loss_mask) of one example."""
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.token_ids[start:end], self.loss_mask[start:end]

    def labels(self, index: int) -> np.ndarray:
        """The example's labels under the module's convention (shifted, -100 where untrained)."""
        input_ids, loss_mask = self.example(index)
        return example_labels(input_ids, loss_mask)


def example_labels(input_ids: Int32[np.ndarray, "seq"],
                   loss_mask: Bool[np.ndarray, "seq"]) -> Int32[np.ndarray, "seq"]:
    labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int32)
    labels[:-1] = np.where(loss_mask[1:], input_ids[1:], IGNORE_INDEX)
    return labels


def tokenize_dataset(records: Sequence[Mapping], tokenizer: Any, cfg: DataConfig, *,
                     progress: bool = True, batch_size: int = 1000) -> TokenizedDataset:
    """Render, tokenize (in batches, with a fast tokenizer), append EOS, build the loss mask and
    truncate to cfg.max_seq_length. Raises DataError if no token in the dataset is trained."""
    validate_fields(records, cfg)
    responses_only = cfg.train_on_responses_only
    if responses_only and not getattr(tokenizer, "is_fast", False):
        raise ConfigError("data.train_on_responses_only needs a fast tokenizer (offset mapping); "
                          f"{type(tokenizer).__name__} is not one")
    eos_id = tokenizer.eos_token_id
    bos_id = tokenizer.bos_token_id
    add_eos = cfg.add_eos and cfg.messages_field is None
    if add_eos and eos_id is None:
        raise ConfigError("data.add_eos is set but the tokenizer has no eos_token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_id or 0)

    all_ids: list[np.ndarray] = []
    all_masks: list[np.ndarray] = []
    num_truncated = num_without_marker = 0
    with tqdm(total=len(records), desc="Tokenizing", unit="ex", disable=not progress) as bar:
        for first in range(0, len(records), batch_size):
            texts = [render_text(row, tokenizer, cfg) for row in records[first:first + batch_size]]
            encoded = tokenizer(texts, add_special_tokens=True, return_attention_mask=False,
                                return_offsets_mapping=responses_only)
            for index, text in enumerate(texts):
                input_ids = np.asarray(encoded["input_ids"][index], dtype=np.int32)
                if responses_only:
                    char_starts = np.asarray(encoded["offset_mapping"][index],
                                             dtype=np.int64).reshape(-1, 2)[:, 0]
                    spans = _trained_char_spans(text, cfg, tokenizer.eos_token)
                    num_without_marker += not spans
                    loss_mask = np.zeros(len(input_ids), dtype=bool)
                    for span_start, span_end in spans:
                        loss_mask |= (char_starts >= span_start) & (char_starts < span_end)
                else:
                    loss_mask = np.ones(len(input_ids), dtype=bool)
                # Chat templates (Llama 3) write the BOS into the text and the tokenizer adds
                # another; a doubled BOS shifts every position the model was trained on.
                if bos_id is not None and len(input_ids) >= 2 and input_ids[0] == input_ids[1] == bos_id:
                    input_ids, loss_mask = input_ids[1:], loss_mask[1:]
                if add_eos and (len(input_ids) == 0 or input_ids[-1] != eos_id):
                    # The EOS is trained whenever anything is: the model must learn to stop.
                    input_ids = np.append(input_ids, np.int32(eos_id))
                    loss_mask = np.append(loss_mask, loss_mask.any() or not responses_only)
                if len(input_ids) > cfg.max_seq_length:
                    num_truncated += 1
                    input_ids = input_ids[:cfg.max_seq_length]
                    loss_mask = loss_mask[:cfg.max_seq_length]
                all_ids.append(input_ids)
                all_masks.append(loss_mask)
            bar.update(len(texts))

    lengths = np.array([len(ids) for ids in all_ids], dtype=np.int64)
    # Position 0 is never a label, so its mask does not count as a trained token.
    trained_per_example = np.array([mask[1:].sum() for mask in all_masks], dtype=np.int64)
    stats = TokenizationStats(
        num_examples=len(all_ids), num_truncated=num_truncated, num_tokens=int(lengths.sum()),
        num_trained_tokens=int(trained_per_example.sum()), num_without_marker=num_without_marker,
        num_fully_masked=int((trained_per_example == 0).sum()))
    if stats.num_trained_tokens == 0:
        if responses_only and num_without_marker == len(all_ids):
            reason = (f"the response marker {cfg.response_marker!r} never occurs in the "
                      f"{len(all_ids)} rendered examples; check data.response_marker against the "
                      "template or chat template")
        elif responses_only:
            reason = (f"the text after the response marker {cfg.response_marker!r} lies beyond "
                      f"max_seq_length={cfg.max_seq_length} (or is empty) in every example")
        else:
            reason = "every example is a single token"
        raise DataError(f"every label in the dataset is masked (-100): {reason}")
    offsets = np.zeros(len(all_ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedDataset(
        token_ids=np.concatenate(all_ids).astype(np.int32),
        loss_mask=np.concatenate(all_masks).astype(bool),
        offsets=offsets, pad_token_id=int(pad_id), max_seq_length=cfg.max_seq_length, stats=stats)


def prepare_datasets(cfg: DataConfig, tokenizer: Any, *, source: Any = None, seed: int = 0,
                     progress: bool = True) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Load, validate, split off the eval set and tokenize: the data half of an SFT run.
    `source` (a Dataset or list of rows) overrides cfg.path."""
    if source is None and cfg.path is None:
        raise ConfigError("data.path is not set and no dataset was passed")
    train_records = load_records(source if source is not None else cfg.path, cfg.split)
    validate_fields(train_records, cfg)
    eval_records = None
    if cfg.eval_path is not None:
        eval_records = load_records(cfg.eval_path, cfg.split)
        validate_fields(eval_records, cfg)
    elif cfg.eval_fraction > 0.0:
        train_records, eval_records = split_eval(train_records, cfg.eval_fraction, seed)
    train = tokenize_dataset(train_records, tokenizer, cfg, progress=progress)
    evaluation = (tokenize_dataset(eval_records, tokenizer, cfg, progress=progress)
                  if eval_records is not None else None)
    return train, evaluation


# ----------------------------------------------------------------------------------------------
# Batching


class Batch(NamedTuple):
    input_ids: Int32[np.ndarray, "batch seq"]
    labels: Int32[np.ndarray, "batch seq"]  # next-token targets, already shifted; -100 = no loss
    positions: Int32[np.ndarray, "batch seq"]  # restart at 0 in each packed segment
    segment_ids: Int32[np.ndarray, "batch seq"]  # 1, 2, ... per example in a row; 0 = padding


def trained_token_count(batch: Batch) -> int:
    """Number of labels that carry loss (the loss normaliser)."""
    return int(np.count_nonzero(batch.labels != IGNORE_INDEX))


def pack_first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit in order: each example goes to the first row with room for it.

    A max segment tree over the rows' free space finds that row in O(log n), so packing a
    100k-example dataset takes a second rather than minutes."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise DataError(f"an example of {lengths.max()} tokens does not fit a packed row of "
                        f"{capacity}; tokenize with max_seq_length <= {capacity}")
    leaves = 1 << max(0, (len(lengths) - 1).bit_length())
    # free[1] is the root; rows not yet opened hold -1 so that no example, even an empty one,
    # lands in them before the rows to their left.
    free = np.full(2 * leaves, -1, dtype=np.int64)
    rows: list[list[int]] = []
    for example, length in enumerate(lengths.tolist()):
        if free[1] >= length:
            node = 1
            while node < leaves:
                node = 2 * node if free[2 * node] >= length else 2 * node + 1
            row = node - leaves
        else:
            row = len(rows)
            rows.append([])
            node = leaves + row
            free[node] = capacity
        rows[row].append(example)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def padded_length(longest: int, seq_len: int, padding: str, pad_to_multiple_of: int | None) -> int:
    """The batch's sequence length S under the padding policy (see DataConfig.padding)."""
    if padding == "max_length":
        length = seq_len
    elif padding == "bucket":
        length = min(seq_len, max(MIN_BUCKET, 1 << max(0, longest - 1).bit_length()))
    elif padding == "longest":
        length = max(longest, 1)
    else:
        raise ConfigError(f"padding must be one of {PADDING_CHOICES}, got {padding!r}")
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    return length


class BatchIterator:
    """Fixed-shape batches over epochs, deterministic for a seed, resumable exactly.

    Rows are examples, or with packing, first-fit packs of examples made once in dataset order
    (as TRL packs the dataset before its sampler shuffles), so every epoch has the same number of
    steps and an LR schedule can be fixed up front. Each epoch visits the rows in the order
    `np.random.default_rng(seed + epoch).permutation` (or in order without shuffle). The last
    partial batch is kept (HF's dataloader_drop_last=False) and topped up with empty rows
    (segment 0, all labels -100) so that its shape matches the others.

    State is (epoch, step within the epoch): `load_state_dict(state_dict())` on a fresh iterator
    yields exactly the batches the uninterrupted one would have.
    """

    def __init__(self, dataset: TokenizedDataset, batch_size: int, *, seq_len: int | None = None,
                 packing: bool = False, shuffle: bool = True, seed: int = 0,
                 padding: str = "bucket", pad_to_multiple_of: int | None = None,
                 drop_last: bool = False, epoch: int = 0, step: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seq_len = seq_len if seq_len is not None else dataset.max_seq_length
        self.packing = packing
        self.shuffle = shuffle
        self.seed = seed
        self.padding = padding
        self.pad_to_multiple_of = pad_to_multiple_of
        self.drop_last = drop_last
        padded_length(1, self.seq_len, padding, pad_to_multiple_of)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if dataset.lengths.max(initial=0) > self.seq_len:
            raise DataError(f"examples are up to {dataset.lengths.max()} tokens but seq_len is "
                            f"{self.seq_len}; tokenize with max_seq_length <= seq_len")
        if packing:
            self.rows = pack_first_fit(dataset.lengths, self.seq_len)
        else:
            self.rows = [[index] for index in range(len(dataset))]
        if batch_size > len(self.rows):
            what = (f"{len(self.rows)} packed rows (from {len(dataset)} examples)" if packing
                    else f"{len(self.rows)} examples")
            raise DataError(f"batch_size={batch_size} is larger than the dataset: {what}; lower "
                            "the batch size or add data")
        self.epoch = epoch
        self.step = step
        self._check_position()

    @classmethod
    def from_config(cls, dataset: TokenizedDataset, cfg: DataConfig, batch_size: int, *,
                    seed: int = 0, shuffle: bool | None = None) -> BatchIterator:
        return cls(dataset, batch_size, seq_len=cfg.max_seq_length, packing=cfg.packing,
                   shuffle=cfg.shuffle if shuffle is None else shuffle, seed=seed,
                   padding=cfg.padding, pad_to_multiple_of=cfg.pad_to_multiple_of)

    @property
    def num_rows(self) -> int:
        """Rows per epoch: examples, or packed rows with packing."""
        return len(self.rows)

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return len(self.rows) // self.batch_size
        return math.ceil(len(self.rows) / self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._check_position()

    def _check_position(self) -> None:
        if self.epoch < 0 or not 0 <= self.step <= self.steps_per_epoch:
            raise DataError(f"data iterator state epoch={self.epoch}, step={self.step} is out of "
                            f"range: an epoch has {self.steps_per_epoch} steps")

    def row_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.rows))
        return np.random.default_rng(self.seed + epoch).permutation(len(self.rows))

    def batch_at(self, epoch: int, step: int) -> Batch:
        """The batch for (epoch, step), independent of the iterator's state."""
        order = self.row_order(epoch)
        chosen = order[step * self.batch_size:(step + 1) * self.batch_size]
        return self._assemble([self.rows[row] for row in chosen])

    def epoch_batches(self, epoch: int = 0) -> Iterator[Batch]:
        """One epoch's batches, without touching the iterator's state (for eval)."""
        for step in range(self.steps_per_epoch):
            yield self.batch_at(epoch, step)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        batch = self.batch_at(self.epoch, self.step)
        self.step += 1
        return batch

    def _assemble(self, rows: list[list[int]]) -> Batch:
        lengths = self.dataset.lengths
        longest = max(int(lengths[row].sum()) for row in rows)
        seq = padded_length(longest, self.seq_len, self.padding, self.pad_to_multiple_of)
        shape = (self.batch_size, seq)
        input_ids = np.full(shape, self.dataset.pad_token_id, dtype=np.int32)
        labels = np.full(shape, IGNORE_INDEX, dtype=np.int32)
        positions = np.zeros(shape, dtype=np.int32)
        segment_ids = np.zeros(shape, dtype=np.int32)
        for row_index, row in enumerate(rows):
            cursor = 0
            for segment, example in enumerate(row, start=1):
                example_ids, example_mask = self.dataset.example(example)
                end = cursor + len(example_ids)
                input_ids[row_index, cursor:end] = example_ids
                # The example's last label is -100, so no label crosses into the next segment.
                labels[row_index, cursor:end] = example_labels(example_ids, example_mask)
                positions[row_index, cursor:end] = np.arange(len(example_ids), dtype=np.int32)
                segment_ids[row_index, cursor:end] = segment
                cursor = end
        return Batch(input_ids, labels, positions, segment_ids)
