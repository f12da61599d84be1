"""Read a dataset from what MCP can carry (a file path, a saved-dataset folder, a hub id, inline records), detect
its row format, check every row, and shape the rows into the columns TRL's SFTTrainer trains on.

Formats: text, alpaca (instruction/input/output), prompt_completion, messages (and ShareGPT `conversations`).
Prompt/completion, Alpaca and chat rows train on the answer only. TRL tokenizes, except chat rows whose template
has no `{% generation %}` markers: those are tokenized here with the assistant mask of data/chat_templates.py
(every assistant turn and its end-of-turn token) and given to TRL as pre-tokenized input_ids + labels (-100 off
the mask), which TRL truncates and packs as they are.

Local files go through data/readers.py (bounded, streaming, cancellable); saved folders (memory-mapped arrow) and
hub ids through the `datasets` library. Rows with empty fields are skipped and counted; invalid rows
(data/rows.py) refuse the dataset, naming them, unless skip_invalid_rows.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_mcp.data.chat_templates import has_generation_marks, tokenize_chat
from llm_mcp.data.readers import (FILE_KINDS, STOP_CHECK_ROWS, Limits, Prefix, RawRow, ReadGate, ReadProgress,
                                  dataset_limits, file_size_checked, read_file_rows, too_many_rows)
from llm_mcp.data.rows import FORMATS_HELP, convert_row, detect_format, has_columns, row_format, shape_problem
from llm_mcp.errors import Cancelled, DatasetError
from llm_mcp.paths import stat_kind

__all__ = ["FORMATS_HELP", "detect_format", "row_format"]  # re-exported: callers and tests import them from here

log = logging.getLogger(__name__)

FILE_TYPES = FILE_KINDS
DETECT_ROWS = 1_000  # the format is detected from the columns of this many first rows
SHOWN_ROWS = 10  # bad rows named in a message
SKIP_HOW = ("set skip_invalid_rows=true in training_config to skip invalid rows (counted and named in the "
            "answer's warnings) and train on the rest")  # how a refusal of invalid rows says the way out


@dataclass
class PreparedDataset:
    """A dataset in TRL's columns, with what was detected and done to it."""

    dataset: Any  # datasets.Dataset with text | prompt+completion | messages | input_ids+labels
    source_format: str
    assistant_only_loss: bool = False  # TRL masks by the template's {% generation %} markers
    tokenized: bool = False  # input_ids + labels, masked here
    warnings: list[str] = field(default_factory=list)


@dataclass
class RowSource:
    """The rows of one dataset argument, read lazily, and how far reading got."""

    name: str  # how messages name it: "train_dataset='/ws/d.jsonl'", or the parameter for inline rows
    rows: Iterator[RawRow]
    progress: ReadProgress
    columns: list[str] | None = None  # a datasets.Dataset's columns; None: the union of the rows' keys


def read_source(source: str | list[dict[str, Any]], *, param: str, should_stop: Callable[[], bool] | None = None,
                prefix: Prefix | None = None) -> RowSource:
    """Anything MCP can carry -> its rows, read as they are iterated (not yet validated). Limits, emptiness and
    file types are checked here, before any row is read; `prefix` reads only the start of a file or folder."""
    limits = dataset_limits()
    if isinstance(source, list):
        if not source:
            raise DatasetError(f"{param} is an empty list; give at least one row ({FORMATS_HELP}).")
        gate = ReadGate(param, param, ReadProgress(bytes_read=None), should_stop=should_stop, prefix=None,
                        limits=limits)
        return RowSource(param, _inline_rows(source, gate), gate.progress)
    if not isinstance(source, str) or not source.strip():
        raise DatasetError(f"{param} must be a file path, a saved-dataset folder, a hub id, or a list of rows.")
    path = Path(source).expanduser()
    kind = stat_kind(path)
    if kind == "dir":
        return _dataset_rows(_read_folder(path, param), f"{param}={str(path)!r}", param, should_stop, prefix, limits)
    if kind == "file":
        return _file_rows(path, param, should_stop, prefix, limits)
    if path.suffix.lower() in FILE_TYPES or source.startswith((".", "/", "~")):
        raise DatasetError(f"{param}={source!r}: no such file or folder (relative paths start at the workspace).")
    return _dataset_rows(_read_hub(source, param), f"{param}={source!r}", param, should_stop, prefix, limits)


def _inline_rows(rows: list[Any], gate: ReadGate) -> Iterator[RawRow]:
    for i, row in enumerate(rows):
        where = f"row {i}"
        gate.row(where)
        yield RawRow(where, row) if isinstance(row, dict) else RawRow(
            where, None, f"is a {type(row).__name__}, not an object with the row's fields")
    gate.progress.rows_total, gate.progress.complete = len(rows), True


def _file_rows(path: Path, param: str, should_stop: Callable[[], bool] | None, prefix: Prefix | None,
               limits: Limits) -> RowSource:
    name = f"{param}={str(path)!r}"
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(f"{name}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_KINDS)} or a "
                           f"datasets.save_to_disk folder.")
    try:
        progress = ReadProgress(file_bytes=file_size_checked(path, name, limits))
    except OSError as exc:
        raise DatasetError(f"{name} could not be read ({exc.strerror or exc}).") from None
    gate = ReadGate(name, param, progress, should_stop=should_stop, prefix=prefix, limits=limits)
    return RowSource(name, _os_errors_named(read_file_rows(path, kind, gate), name), progress)


def _os_errors_named(rows: Iterator[RawRow], name: str) -> Iterator[RawRow]:
    try:
        yield from rows
    except OSError as exc:  # unreadable, or gone while read
        raise DatasetError(f"{name} could not be read ({exc.strerror or exc}).") from None


def _dataset_rows(dataset: Any, name: str, param: str, should_stop: Callable[[], bool] | None,
                  prefix: Prefix | None, limits: Limits) -> RowSource:
    """A datasets.Dataset's rows (memory-mapped arrow), under the same row limit and stop checks as files."""
    total = len(dataset)
    if prefix is None and total > limits.max_rows:
        raise too_many_rows(name, limits.max_rows)
    progress = ReadProgress(bytes_read=None, rows_total=total)
    gate = ReadGate(name, param, progress, should_stop=should_stop, prefix=prefix, limits=limits)
    shown = dataset if prefix is None or total <= prefix.rows else dataset.select(range(prefix.rows))

    def rows() -> Iterator[RawRow]:
        for i, row in enumerate(shown):
            gate.row(f"row {i}")
            yield RawRow(f"row {i}", row)
        progress.complete = progress.rows_read >= total

    return RowSource(name, rows(), progress, list(dataset.column_names))


def _read_folder(path: Path, param: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DatasetError(f"{param}={str(path)!r} is a folder but not one written by datasets.save_to_disk "
                           f"({exc}); pass a file path instead.") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        return loaded[split]
    return loaded


def _read_hub(source: str, param: str) -> Any:
    import datasets

    name, _, split = source.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as exc:
        raise DatasetError(f"{param}={source!r} is not a local file or folder, and loading it as a hub dataset "
                           f"('name' or 'name:split') failed: {type(exc).__name__}: {exc}") from None


# -- rows checked in one format ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckedRow:
    """A row as read and as converted: usable (converted), empty (neither), or invalid (problem)."""

    where: str
    raw: dict[str, Any] | None
    converted: dict[str, Any] | None
    problem: str | None


class CheckedRows:
    """A source's rows in one format, checked as they are read. The format is the one asked for, or detected
    from the columns of the first DETECT_ROWS rows (a whole file is never held just to detect it). The first
    usable row also fixes the shape of the converted rows (prompt/completion rows are strings or lists of
    messages): rows of the other shape are invalid, since TRL takes one shape per dataset."""

    def __init__(self, source: RowSource, *, dataset_format: str) -> None:
        self.source = source
        self._head, self._pending = _head_of(source.rows)
        self.columns: list[str] = source.columns or _keys_of(r.row for r in self._head)
        if not self._head:
            if self._pending is not None:
                raise self._pending
            raise DatasetError(f"{source.name} has no rows; write at least one row.")
        if not self.columns:  # not one row read could be parsed: say why rather than "no columns"
            raise DatasetError(f"{source.name} has no readable row among its first {len(self._head)}: "
                               f"{_listed([f'{r.where}: {r.problem}' for r in self._head])}.")
        self.fmt = chosen_format(self.columns, dataset_format, source.name)

    def __iter__(self) -> Iterator[CheckedRow]:
        first: tuple[dict[str, Any], str] | None = None  # the first usable row (converted) and where it is
        for raw in itertools.chain(self._head, self._rest()):
            if raw.problem is not None:
                yield CheckedRow(raw.where, None, None, raw.problem)
                continue
            converted = convert_row(raw.row, self.fmt)
            if converted.row is not None:
                if first is None:
                    first = (converted.row, raw.where)
                else:
                    problem = shape_problem(converted.row, *first)
                    if problem is not None:
                        yield CheckedRow(raw.where, raw.row, None, problem)
                        continue
            yield CheckedRow(raw.where, raw.row, converted.row, converted.problem)

    def _rest(self) -> Iterator[RawRow]:
        if self._pending is not None:  # reading failed among the first rows: after them, the failure
            raise self._pending
        for raw in self.source.rows:
            if raw.row is not None and self.source.columns is None:
                self.columns += [k for k in raw.row if k not in self.columns]
            yield raw


def _head_of(rows: Iterator[RawRow]) -> tuple[list[RawRow], DatasetError | None]:
    """The first DETECT_ROWS rows, and the DatasetError reading raised among them, if any (raised after them)."""
    head: list[RawRow] = []
    try:
        for raw in rows:
            head.append(raw)
            if len(head) >= DETECT_ROWS:
                break
    except DatasetError as exc:
        return head, exc
    return head, None


def _keys_of(rows: Iterator[Any]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            keys.update(dict.fromkeys(row))
    return list(keys)


def chosen_format(columns: list[str], dataset_format: str, name: str) -> str:
    """The format asked for, or detected from the columns; refuses columns that fit no format."""
    found = detect_format(columns)
    fmt = found if dataset_format == "auto" else ("sharegpt" if dataset_format == "messages" and found == "sharegpt"
                                                  else dataset_format)
    if fmt is None or not has_columns(columns, fmt):
        raise DatasetError(f"{name}: columns {columns} match no known format"
                           f"{'' if dataset_format == 'auto' else f' (dataset_format={dataset_format!r})'}; "
                           f"expected {FORMATS_HELP}.")
    return fmt


class Tally:
    """A count of rows, with the first few named."""

    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.first) < SHOWN_ROWS:
            self.first.append(text)


def _listed(items: list[str]) -> str:
    return "; ".join(items[:SHOWN_ROWS]) + (f"; ... ({len(items) - SHOWN_ROWS} more)" if len(items) > SHOWN_ROWS
                                             else "")


def invalid_rows_message(name: str, invalid: Tally) -> str:
    """The refusal for invalid rows: the dataset, each row (the first few) and why, and the way out."""
    if invalid.count == 1:
        return f"{name} {invalid.first[0]}. Fix the row, or {SKIP_HOW}."
    more = f" (the first {len(invalid.first)} shown)" if invalid.count > len(invalid.first) else ""
    return f"{name} has {invalid.count} invalid rows{more}: {'; '.join(invalid.first)}. Fix them, or {SKIP_HOW}."


# -- preparation for training --------------------------------------------------------------------------------------

def prepare(source: str | list[dict[str, Any]], *, dataset_format: str, chat_template: str | None,
            param: str, tokenizer: Any = None, should_stop: Callable[[], bool] | None = None,
            skip_invalid_rows: bool = False) -> PreparedDataset:
    """Read, detect, check and convert a dataset for SFTTrainer; errors name the columns found or the rows at
    fault. With the model's tokenizer, chat rows train on every assistant turn whatever the template."""
    rows = CheckedRows(read_source(source, param=param, should_stop=should_stop), dataset_format=dataset_format)
    usable, labels, empty, invalid = [], [], Tally(), Tally()
    for row in rows:
        if row.problem is not None:
            invalid.add(f"{row.where}: {row.problem}")
        elif row.converted is None:
            empty.add(row.where)
        else:
            usable.append(row.converted)
            labels.append(row.where)
    if invalid.count and not skip_invalid_rows:
        raise DatasetError(invalid_rows_message(rows.source.name, invalid))
    total = len(usable) + empty.count + invalid.count
    if not usable:
        raise DatasetError(f"{param}: none of its {total} rows has usable content for format {rows.fmt!r}; "
                           f"check for empty fields{' and the invalid rows skipped' if invalid.count else ''}.")
    warnings = []
    if empty.count:
        warnings.append(f"{param}: skipped {empty.count} of {total} rows with empty fields "
                        f"(first: {', '.join(empty.first)}).")
    if invalid.count:
        warnings.append(f"{param}: skipped {invalid.count} of {total} invalid rows (skip_invalid_rows): "
                        f"{'; '.join(invalid.first)}{'; ...' if invalid.count > len(invalid.first) else ''}.")
    return _to_trl(usable, rows.fmt, chat_template, warnings, tokenizer, param, labels, should_stop)


def to_training_rows(rows: list[dict[str, Any]], fmt: str, chat_template: str | None, tokenizer: Any = None,
                     labels: list[str] | None = None) -> PreparedDataset:
    """Converted rows -> the dataset SFTTrainer gets (chat rows may become pre-tokenized rows)."""
    return _to_trl(rows, fmt, chat_template, [], tokenizer, "dataset", labels, None)


def _to_trl(rows: list[dict[str, Any]], fmt: str, chat_template: str | None, warnings: list[str],
            tokenizer: Any, param: str, labels: list[str] | None,
            should_stop: Callable[[], bool] | None) -> PreparedDataset:
    import datasets

    if "messages" not in rows[0]:
        return PreparedDataset(datasets.Dataset.from_list(rows), fmt, warnings=warnings)
    if has_generation_marks(chat_template):
        return PreparedDataset(datasets.Dataset.from_list(rows), fmt, assistant_only_loss=True, warnings=warnings)
    if tokenizer is not None:
        labels = labels or [f"row {i}" for i in range(len(rows))]
        return _tokenized(rows, labels, fmt, tokenizer, warnings, param, should_stop)
    # Without a tokenizer nothing can be rendered: train on the last assistant turn as a conversational
    # prompt/completion pair, which TRL masks itself.
    split = []
    for r in rows:
        msgs = r["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        split.append({"prompt": msgs[:last], "completion": [msgs[last]]})
    if any(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows):
        warnings.append("without the model's tokenizer, multi-turn rows train on their last assistant turn only; "
                        "earlier turns are context.")
    return PreparedDataset(datasets.Dataset.from_list(split), fmt, warnings=warnings)


def _tokenized(rows: list[dict[str, Any]], labels: list[str], fmt: str, tokenizer: Any, warnings: list[str],
               param: str, should_stop: Callable[[], bool] | None) -> PreparedDataset:
    """Chat rows rendered with the model's template and tokenized; labels are the assistant turns' tokens, -100
    elsewhere: a labels column is taken as is by TRL 1.16 and by the TRL 1.15 Unsloth patches (both checked)."""
    import datasets

    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    empty = []
    for i, (row, where) in enumerate(zip(rows, labels)):
        if i % STOP_CHECK_ROWS == 0 and should_stop is not None and should_stop():
            raise Cancelled(f"tokenizing {param} stopped: the command was cancelled at {where}.")
        try:
            encoded = tokenize_chat(tokenizer, row["messages"])
        except Exception as exc:  # the template refuses the conversation (e.g. a role it does not know)
            raise DatasetError(f"{param} {where} cannot be rendered with the model's chat template "
                               f"({type(exc).__name__}: {str(exc)[:300]}); fix the row or load with another "
                               f"chat_template.") from None
        if not any(encoded["assistant_masks"]):
            empty.append(where)
            continue
        columns["input_ids"].append(encoded["input_ids"])
        columns["labels"].append([t if m else -100 for t, m in zip(encoded["input_ids"], encoded["assistant_masks"])])
    if not columns["input_ids"]:
        raise DatasetError(f"{param}: the model's chat template leaves no assistant tokens to train on in any row "
                           f"(it does not write the assistant turns).")
    if empty:
        warnings.append(f"{param}: skipped {len(empty)} rows whose assistant turns the chat template does not "
                        f"write (first: {', '.join(empty[:SHOWN_ROWS])}).")
    return PreparedDataset(datasets.Dataset.from_dict(columns), fmt, tokenized=True, warnings=warnings)
