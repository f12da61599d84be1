"""Bounded, streaming, cancellable readers for local dataset files (.jsonl, .json, .csv, .txt, .parquet).

A file over the size limit is refused before reading; rows are read one at a time, a line or JSON item never
past MAX_LINE_BYTES, never more rows than the row limit, and should_stop() is asked every few hundred rows or
MiB. A row that cannot be read (not valid JSON, not an object) comes back with the reason instead of a row, so
callers decide whether to refuse or skip it. No torch and no `datasets` here: the server process reads a
bounded prefix of a file with these (inspect_dataset without a model).

Row positions: "line N" (1-based) in line-based files, "row i" (0-based index) in a JSON array or parquet file.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from llm_mcp.errors import Cancelled, DatasetError

MiB = 1024 * 1024
MAX_LINE_BYTES = 16 * MiB  # one JSON line, CSV line, text line or JSON array item
DEFAULT_MAX_BYTES = 2 * 1024 * MiB
DEFAULT_MAX_ROWS = 10_000_000
BYTES_ENV, ROWS_ENV = "LLM_MCP_MAX_DATASET_BYTES", "LLM_MCP_MAX_DATASET_ROWS"
BYTES_OPTION, ROWS_OPTION = "--max-dataset-bytes", "--max-dataset-rows"
STOP_CHECK_ROWS = 256  # ask should_stop() at least this often...
STOP_CHECK_BYTES = MiB  # ...and after this many bytes, whichever comes first
_CHUNK = MiB  # JSON array reads
_TOKEN_TAIL = 16  # characters: a JSON token cut by the end of a read errs no further back than this (-Infinity)
LINE_KINDS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".txt": "text"}
FILE_KINDS = {**LINE_KINDS, ".parquet": "parquet"}

StopFn = Callable[[], bool] | None


@dataclass(frozen=True)
class Limits:
    """The largest dataset file the server reads, in bytes and in rows."""

    max_bytes: int
    max_rows: int


def dataset_limits() -> Limits:
    """The limits from the environment (the server passes its options to workers this way), else the defaults."""
    return Limits(max_bytes=_env_int(BYTES_ENV, DEFAULT_MAX_BYTES, BYTES_OPTION),
                  max_rows=_env_int(ROWS_ENV, DEFAULT_MAX_ROWS, ROWS_OPTION))


def _env_int(name: str, default: int, option: str) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise DatasetError(f"{name}={value!r} is not valid; expected a whole number >= 1 (server option {option}).")
    return number


@dataclass(frozen=True)
class Prefix:
    """Read only the start of a dataset: at most this many rows and bytes (inspect_dataset in the server)."""

    rows: int
    bytes: int


@dataclass
class ReadProgress:
    """How far reading got; `complete` once the end was reached."""

    file_bytes: int | None = None
    bytes_read: int | None = 0  # None where not meaningful (parquet, folders, hub datasets)
    rows_read: int = 0
    rows_total: int | None = None  # known up front for parquet and folders, else once read to the end
    complete: bool = False


@dataclass(frozen=True)
class RawRow:
    """One row as read: where it is, the row (a JSON object) or None, and why it could not be read."""

    where: str
    row: Any
    problem: str | None = None


class ReadGate:
    """The counters every reader goes through: the row limit, the prefix, and should_stop() checked often."""

    def __init__(self, name: str, param: str, progress: ReadProgress, *, should_stop: StopFn,
                 prefix: Prefix | None, limits: Limits) -> None:
        self.name, self.param, self.progress = name, param, progress
        self.should_stop, self.prefix, self.limits = should_stop, prefix, limits
        self._rows_since_check = 0
        self._bytes_since_check = 0

    def prefix_done(self) -> bool:
        """True once the prefix asked for is read: the reader stops there, short of the end."""
        p = self.progress
        return self.prefix is not None and (p.rows_read >= self.prefix.rows or (p.bytes_read or 0) >= self.prefix.bytes)

    def read_bytes(self, n: int, where: str) -> None:
        if self.progress.bytes_read is not None:
            self.progress.bytes_read += n
        self._bytes_since_check += n
        if self._bytes_since_check >= STOP_CHECK_BYTES:
            self.check_stop(where)

    def row(self, where: str) -> None:
        """Count a row about to be handed out; refuses the row past the limit."""
        if self.progress.rows_read >= self.limits.max_rows:
            raise too_many_rows(self.name, self.limits.max_rows)
        self.progress.rows_read += 1
        self._rows_since_check += 1
        if self._rows_since_check >= STOP_CHECK_ROWS:
            self.check_stop(where)

    def check_stop(self, where: str) -> None:
        self._rows_since_check = self._bytes_since_check = 0
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"reading {self.param} stopped: the command was cancelled at {where} "
                            f"({self.progress.rows_read} rows read).")


def too_many_rows(name: str, max_rows: int) -> DatasetError:
    return DatasetError(f"{name} has more than {max_rows} rows, the server's limit (option {ROWS_OPTION}, "
                        f"environment {ROWS_ENV}); split the dataset or raise the limit.")


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n} bytes"


def file_size_checked(path: Path, name: str, limits: Limits) -> int:
    """The file's size; refuses an empty file or one over the size limit before any byte is read."""
    size = path.stat().st_size
    if size == 0:
        raise DatasetError(f"{name} is empty (0 bytes); write at least one row into it.")
    if size > limits.max_bytes:
        raise DatasetError(f"{name} is {size} bytes, over the server's limit of {limits.max_bytes} bytes (option "
                           f"{BYTES_OPTION}, environment {BYTES_ENV}); split the file or raise the limit.")
    return size


def read_file_rows(path: Path, kind: str, gate: ReadGate) -> Iterator[RawRow]:
    """Rows of a local file of a known kind (a FILE_KINDS value); sets gate.progress.complete at the end."""
    if kind == "parquet":
        yield from _parquet_rows(path, gate)
    else:
        with open(path, "rb") as f:
            if kind == "jsonl" or (kind == "json" and not _starts_array(f)):  # a .json file of JSON Lines
                yield from _json_lines(f, gate)
            elif kind == "json":
                yield from _json_array(f, gate)
            elif kind == "csv":
                yield from _csv_rows(f, gate)
            else:
                yield from _text_lines(f, gate)
    p = gate.progress
    if p.bytes_read is not None and p.file_bytes is not None and p.bytes_read >= p.file_bytes:
        p.rows_total = p.rows_read  # every byte read, though the prefix ended just there
    p.complete = p.rows_total is not None and p.rows_read >= p.rows_total


# -- lines ---------------------------------------------------------------------------------------------------------

def _lines(f: BinaryIO, gate: ReadGate) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes without the line break) for every line, each at most MAX_LINE_BYTES; stops early
    once the prefix is read, and marks the end reached."""
    number = 0
    while not gate.prefix_done():
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            gate.progress.rows_total = gate.progress.rows_read
            return
        number += 1
        gate.read_bytes(len(raw), f"line {number}")
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise DatasetError(f"{gate.name} line {number} is longer than {_size(MAX_LINE_BYTES)} without a "
                               f"line break, so reading stops there; one row per line, each under that size, is "
                               f"allowed.")
        yield number, raw.rstrip(b"\r\n")


def _decoded(raw: bytes, number: int) -> str:
    return raw.decode("utf-8-sig" if number == 1 else "utf-8")


def _json_lines(f: BinaryIO, gate: ReadGate) -> Iterator[RawRow]:
    for number, raw in _lines(f, gate):
        if not raw.strip():
            continue  # a blank line is no row
        where = f"line {number}"
        gate.row(where)
        yield _parsed(raw, number, where)


def _parsed(raw: bytes, number: int, where: str) -> RawRow:
    try:
        row = json.loads(_decoded(raw, number))
    except UnicodeDecodeError as exc:
        return RawRow(where, None, f"not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start})")
    except json.JSONDecodeError as exc:
        return RawRow(where, None, f"not valid JSON ({exc.msg}: column {exc.colno})")
    if not isinstance(row, dict):
        return RawRow(where, None, f"is a JSON {type(row).__name__}, not an object with the row's fields")
    return RawRow(where, row)


def _text_lines(f: BinaryIO, gate: ReadGate) -> Iterator[RawRow]:
    for number, raw in _lines(f, gate):
        if not raw.strip():
            continue
        where = f"line {number}"
        gate.row(where)
        try:
            yield RawRow(where, {"text": _decoded(raw, number)})
        except UnicodeDecodeError as exc:
            yield RawRow(where, None, f"not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start})")


# -- csv -----------------------------------------------------------------------------------------------------------

def _csv_rows(f: BinaryIO, gate: ReadGate) -> Iterator[RawRow]:
    # csv's own cap on a field is far below a line's; raising it is process-wide but only ever upward
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))
    reader = csv.reader(_csv_text(f, gate))
    try:
        header = next(reader, None)
        if not header:
            raise DatasetError(f"{gate.name} has no header line; a CSV dataset starts with its column names.")
        start = reader.line_num + 1
        for record in reader:
            where, start = f"line {start}", reader.line_num + 1
            if not record:
                continue  # a blank line
            gate.row(where)
            if len(record) != len(header):
                yield RawRow(where, None, f"has {len(record)} fields; the header names {len(header)}")
            else:
                yield RawRow(where, dict(zip(header, record)))
    except csv.Error as exc:
        raise DatasetError(f"{gate.name} line {reader.line_num} is not valid CSV ({exc}).") from None


def _csv_text(f: BinaryIO, gate: ReadGate) -> Iterator[str]:
    for number, raw in _lines(f, gate):
        try:
            yield _decoded(raw, number) + "\n"
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{gate.name} line {number} is not valid UTF-8 (byte {raw[exc.start]:#04x} at "
                               f"offset {exc.start}); save the file as UTF-8.") from None


# -- one JSON array ------------------------------------------------------------------------------------------------

def _starts_array(f: BinaryIO) -> bool:
    """Whether the file's first non-blank character opens a JSON array (else it is read as JSON Lines)."""
    head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    f.seek(0)
    return head.startswith(b"[")


class _JsonArray:
    """Decodes one JSON array item at a time from a growing text buffer; reads MiB by MiB."""

    def __init__(self, f: BinaryIO, gate: ReadGate) -> None:
        self.f, self.gate = f, gate
        self.text = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.at, self.eof = "", 0, False

    def more(self, where: str) -> None:
        raw = self.f.read(max(_CHUNK, len(self.buf) - self.at))  # doubling: a large item is parsed few times
        self.eof = not raw
        self.gate.read_bytes(len(raw), where)
        try:
            self.buf = self.buf[self.at:] + self.text.decode(raw, final=self.eof)
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{self.gate.name} near {where} is not valid UTF-8 ({exc.reason}); save the file as "
                               f"UTF-8.") from None
        self.at = 0

    def next_char(self, where: str) -> str:
        """The next non-blank character, not consumed; '' at the end of the file."""
        while True:
            while self.at < len(self.buf) and self.buf[self.at] in " \t\r\n":
                self.at += 1
            if self.at < len(self.buf) or self.eof:
                return self.buf[self.at:self.at + 1]
            self.more(where)

    def item(self, where: str) -> Any:
        decoder = json.JSONDecoder()
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.at)
            except json.JSONDecodeError as exc:
                if self.eof or not _ran_out(exc, len(self.buf)):
                    raise DatasetError(f"{self.gate.name} {where} is not valid JSON ({exc.msg} at character "
                                       f"{exc.pos - self.at + 1} of the row); a .json dataset is one array of row "
                                       f"objects.") from None
                if len(self.buf) - self.at > MAX_LINE_BYTES:
                    raise self.too_long(where) from None
                self.more(where)
                continue
            if end - self.at > MAX_LINE_BYTES:  # characters, not bytes: close enough for a cap
                raise self.too_long(where)
            self.at = end
            return value

    def too_long(self, where: str) -> DatasetError:
        return DatasetError(f"{self.gate.name} {where} is longer than {_size(MAX_LINE_BYTES)}, so reading stops "
                            f"there; rows under that size are allowed.")


def _ran_out(exc: json.JSONDecodeError, buffered: int) -> bool:
    """Whether a decode error may be only the end of what was read so far (more text could make it valid): an
    unterminated string, or an error within the few characters a cut token leaves (`tru`, `1.5e-`, `\\ud83d\\ude0`)
    at the end. An error before those is in the text itself, whatever follows."""
    return exc.msg.startswith("Unterminated string") or exc.pos >= buffered - _TOKEN_TAIL


def _json_array(f: BinaryIO, gate: ReadGate) -> Iterator[RawRow]:
    array = _JsonArray(f, gate)
    array.next_char("row 0")
    array.at += 1  # the '[' _starts_array saw
    index = 0
    while not gate.prefix_done():
        where = f"row {index}"
        if array.next_char(where) == "]":
            gate.progress.rows_total = gate.progress.rows_read
            return
        gate.row(where)
        value = array.item(where)
        yield RawRow(where, value) if isinstance(value, dict) else RawRow(
            where, None, f"is a JSON {type(value).__name__}, not an object with the row's fields")
        following = array.next_char(where)
        if following not in (",", "]"):
            raise DatasetError(f"{gate.name} after {where}: expected ',' or ']', found {following or 'the end'!r}; "
                               f"a .json dataset is one array of row objects.")
        array.at += following == ","
        index += 1


# -- parquet -------------------------------------------------------------------------------------------------------
#
# pyarrow decodes a parquet file a row group at a time unless told otherwise: its default (pre_buffer=True, or no
# buffer_size) reads each column chunk of the group whole, so a 170 MB file of one row group costs 170 MB to read
# its first row. With pre_buffer=False and a buffer_size, the pages of a column stream through that buffer and
# iter_batches decodes page by page: a batch of a few rows costs about one page per column. Pages are the smallest
# unit: a writer that puts a whole column chunk in one page (fastparquet does, so can pyarrow's data_page_size)
# makes even one row cost the chunk. So a bounded (sampled) read decodes only row groups of at most
# SERVER_ROW_GROUP_BYTES, and of those only the rows that fit the byte budget by the metadata's bytes per row;
# else it reads nothing there and says so (the model's worker reads every row).

_PARQUET_BUFFER = 256 * 1024  # per column: the stream a column's pages are read through
SERVER_ROW_GROUP_BYTES = 128 * MiB  # a row group the server may decode whole in a bounded read


class TooLargeToSample(DatasetError):
    """A bounded read that cannot read even the first rows of a parquet file within its byte budget (its first
    row group too large and its pages too large, or unknown, to read part of it). Carries what the metadata says:
    the columns and the row count."""

    def __init__(self, message: str, columns: list[str], rows_total: int) -> None:
        super().__init__(message)
        self.columns, self.rows_total = columns, rows_total


def _parquet_rows(path: Path, gate: ReadGate) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path, buffer_size=_PARQUET_BUFFER, pre_buffer=False)
    except Exception as exc:  # pyarrow raises several kinds for a file that is not parquet
        raise DatasetError(f"{gate.name} could not be read as parquet ({type(exc).__name__}: {exc}).") from None
    meta = parquet.metadata
    total = meta.num_rows
    gate.progress.rows_total, gate.progress.bytes_read = total, None
    if total > gate.limits.max_rows and gate.prefix is None:
        raise too_many_rows(gate.name, gate.limits.max_rows)
    budget = None if gate.prefix is None else gate.prefix.bytes  # bytes of row data a bounded read may decode
    index = 0
    for group in range(meta.num_row_groups):
        group_meta = meta.row_group(group)
        rows = group_meta.num_rows
        if rows == 0:
            continue
        take = rows
        if budget is not None:
            if budget <= 0 and index > 0:
                return  # the sample's bytes are read
            take, why = _rows_within(path, group_meta, budget)
            if take == 0:
                if index == 0:
                    raise TooLargeToSample(
                        f"{gate.name}: its first row group is too large to sample in the server ({why}), so no row "
                        f"was read; pass model_id to inspect it in the model's worker, which reads every row "
                        f"(training does too).", list(parquet.schema_arrow.names), total)
                return  # the sample ends before this row group
            budget -= group_meta.total_byte_size * take // rows
        left = take
        batches = parquet.iter_batches(batch_size=min(STOP_CHECK_ROWS, take), row_groups=[group])
        while left and not gate.prefix_done():
            batch = next(batches, None)
            if batch is None:
                break
            for row in batch.to_pylist()[:left]:
                if gate.prefix_done():
                    return
                where = f"row {index}"
                gate.row(where)
                yield RawRow(where, row)
                index += 1
                left -= 1
        if take < rows or gate.prefix_done():
            return  # the sample ends within this row group


def _rows_within(path: Path, group: Any, budget: int) -> tuple[int, str]:
    """How many of a row group's first rows a bounded read may decode within `budget` bytes, and why none if 0.
    pyarrow decodes at least a page of each column at once and, for a writer that puts a column chunk in one
    page, the whole row group: so a row group larger than the server may hold whole is not read there."""
    rows, size = group.num_rows, group.total_byte_size
    if size > SERVER_ROW_GROUP_BYTES:
        return 0, (f"{size} bytes in {rows} rows, more than the {SERVER_ROW_GROUP_BYTES} bytes the server may "
                   f"decode at once")
    if size <= budget:
        return rows, ""
    return max(0, budget) * rows // max(size, 1), f"{size} bytes in {rows} rows, over the {budget} bytes read"


