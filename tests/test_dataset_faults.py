"""Issue 16: faulty and oversized datasets. Bounded streaming reads (size and row limits, a cap on a line, a
prefix only in the server process), should_stop honoured while reading and tokenizing, and errors that name the
file, the row and the reason: malformed lines, empty files, chat rows out of order. Unit tests of data/, then the
server's inspect_dataset through the MCP client."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import write_jsonl
from llm_mcp.data import inspect as inspect_module, readers
from llm_mcp.data.datasets import prepare, read_source
from llm_mcp.data.inspect import SAMPLE, inspect_dataset
from llm_mcp.errors import Cancelled, DatasetError

ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(32)]
SPARSE_BYTES = 2_000_000_000  # a "2 GB" file, under the default 2 GiB limit so reading is what bounds it
USER, ASSISTANT = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}
SYSTEM = {"role": "system", "content": "Be brief."}


def _prepare(source, **kw):
    return prepare(source, dataset_format="auto", chat_template=None, param="train_dataset", **kw)


def _malformed_at_17(path: Path) -> Path:
    lines = [json.dumps(r) for r in ROWS]
    lines[16] = lines[16].replace(", ", " ", 1)  # line 17: no comma between the fields
    path.write_text("\n".join(lines) + "\n")
    return path


class StopAfter:
    """should_stop() that answers True from its n-th call on, counting its calls."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


# -- limits and bounded reads --------------------------------------------------------------------------------------

def test_limits_come_from_the_environment(monkeypatch):
    """dataset_limits() reads the two environment variables, with defaults, and refuses a value that is no count."""
    monkeypatch.delenv(readers.BYTES_ENV, raising=False)
    monkeypatch.delenv(readers.ROWS_ENV, raising=False)
    assert readers.dataset_limits() == readers.Limits(readers.DEFAULT_MAX_BYTES, readers.DEFAULT_MAX_ROWS)
    monkeypatch.setenv(readers.BYTES_ENV, "1234")
    monkeypatch.setenv(readers.ROWS_ENV, "56")
    assert readers.dataset_limits() == readers.Limits(1234, 56)
    monkeypatch.setenv(readers.ROWS_ENV, "many")
    with pytest.raises(DatasetError, match="LLM_MCP_MAX_DATASET_ROWS='many'.*--max-dataset-rows"):
        readers.dataset_limits()


def test_file_over_the_byte_limit_is_refused_before_reading(tmp_path, monkeypatch):
    """A file larger than LLM_MCP_MAX_DATASET_BYTES is refused naming the file, its size, the limit and the
    option, by training and by inspection alike."""
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    monkeypatch.setenv(readers.BYTES_ENV, "1000")
    size = path.stat().st_size
    for call in (lambda: _prepare(str(path)), lambda: inspect_dataset(str(path), dataset_format="auto")):
        with pytest.raises(DatasetError) as err:
            call()
        assert str(path) in str(err.value) and f"{size} bytes" in str(err.value)
        assert "1000 bytes" in str(err.value) and "--max-dataset-bytes" in str(err.value)


def test_row_limit_refuses_training_and_is_reported_by_inspection(tmp_path, monkeypatch):
    """More rows than LLM_MCP_MAX_DATASET_ROWS: training refuses naming the limit and its option; exactly the
    limit is fine; inspection reports it as a problem after the rows it read."""
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    monkeypatch.setenv(readers.ROWS_ENV, "31")
    with pytest.raises(DatasetError, match="more than 31 rows.*--max-dataset-rows"):
        _prepare(str(path))
    problems = " ".join(inspect_dataset(str(path), dataset_format="auto")["problems"])
    assert "more than 31 rows" in problems
    monkeypatch.setenv(readers.ROWS_ENV, "32")
    assert len(_prepare(str(path)).dataset) == 32


def test_sparse_2gb_file_is_read_only_as_far_as_the_line_cap(tmp_path):
    """32 rows then a 2 GB tail of NUL bytes without a newline: inspection without a model answers with the 32
    rows, the read bounded and said in `sampled`, the total unknown; training refuses naming line 33."""
    path = write_jsonl(tmp_path / "big.jsonl", ROWS)
    os.truncate(path, SPARSE_BYTES)
    answer = inspect_dataset(str(path), dataset_format="auto")
    assert answer["rows"] == answer["usable_rows"] == 32
    sampled = answer["sampled"]
    assert sampled["rows_read"] == 32 and sampled["file_bytes"] == SPARSE_BYTES and sampled["rows_total"] is None
    assert sampled["bytes_read"] <= readers.MAX_LINE_BYTES + 2 * 4096
    assert "line 33" in " ".join(answer["problems"]) and "not known" in answer["note"]
    with pytest.raises(DatasetError, match=r"line 33 is longer than 16 MiB"):
        _prepare(str(path))


def test_inspection_without_a_model_reads_a_prefix_of_a_large_file(tmp_path):
    """Past SAMPLE rows, inspection without a model stops reading and says so; with a tokenizer's absence only
    the prefix counts as rows. A file that fits in the prefix is read to the end and says nothing of sampling."""
    rows = [{"text": f"row number {i}"} for i in range(SAMPLE.rows + 500)]
    answer = inspect_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows)), dataset_format="auto")
    assert answer["rows"] == SAMPLE.rows and answer["sampled"]["rows_read"] == SAMPLE.rows
    assert answer["sampled"]["rows_total"] is None and answer["sampled"]["bytes_read"] < answer["sampled"]["file_bytes"]
    small = inspect_dataset(str(write_jsonl(tmp_path / "s.jsonl", rows[:SAMPLE.rows])), dataset_format="auto")
    assert small["rows"] == SAMPLE.rows and "sampled" not in small


def test_line_cap_applies_to_every_line_based_kind(tmp_path, monkeypatch):
    """A line (or a JSON array item) over the cap stops reading at once, naming where."""
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 64)
    long = "x" * 100
    (tmp_path / "d.txt").write_text(f"short\n{long}\n")
    (tmp_path / "d.csv").write_text(f"text\nshort\n{long}\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": long}) + "\n")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "short"}, {"text": long}]))
    for name, where in (("d.txt", "line 2"), ("d.csv", "line 3"), ("d.jsonl", "line 2"), ("d.json", "row 1")):
        with pytest.raises(DatasetError, match=f"{where} is longer than"):
            _prepare(str(tmp_path / name))


def test_json_array_is_streamed_across_chunk_boundaries(tmp_path, monkeypatch):
    """A .json array read in tiny chunks (items and multi-byte characters split between reads) gives every row
    intact; an item that is not an object is named by its index."""
    monkeypatch.setattr(readers, "_CHUNK", 7)
    rows = [{"prompt": f"Frage {i} – größer?", "completion": f"Antwort {i} ✓"} for i in range(40)]
    (tmp_path / "d.json").write_text("\ufeff  " + json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    got = _prepare(str(tmp_path / "d.json"))
    assert got.dataset.to_list() == rows
    (tmp_path / "bad.json").write_text(json.dumps(rows[:3] + ["just a string"] + rows[3:5]))
    with pytest.raises(DatasetError, match="row 3: is a JSON str, not an object"):
        _prepare(str(tmp_path / "bad.json"))


def test_csv_rows_are_named_by_their_first_line(tmp_path):
    """CSV rows spanning lines (quoted line breaks) keep the line numbers right; a row with the wrong number of
    fields is refused naming its line."""
    (tmp_path / "d.csv").write_text('prompt,completion\n"two\nlines",a\nq,b\nq,c,extra\n')
    with pytest.raises(DatasetError, match="line 5: has 3 fields; the header names 2"):
        _prepare(str(tmp_path / "d.csv"))
    got = _prepare(str(tmp_path / "d.csv"), skip_invalid_rows=True)
    assert got.dataset.to_list() == [{"prompt": "two\nlines", "completion": "a"}, {"prompt": "q", "completion": "b"}]


def test_parquet_rows_are_named_by_index_and_counted_up_front(tmp_path, monkeypatch):
    """A parquet file's row count comes from its metadata: over the row limit it is refused before reading; its
    invalid rows are named by index."""
    import pandas as pd

    rows = ROWS[:5] + [{"prompt": "q", "completion": None}]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    got = _prepare(str(tmp_path / "d.parquet"))
    assert len(got.dataset) == 5 and "skipped 1 of 6 rows with empty fields (first: row 5)" in got.warnings[0]
    monkeypatch.setenv(readers.ROWS_ENV, "5")
    with pytest.raises(DatasetError, match="more than 5 rows"):
        _prepare(str(tmp_path / "d.parquet"))


def _parquet(path: Path, rows: int, **options) -> Path:
    """`rows` prompt/completion rows of about 1 KB each in one row group, written with pyarrow's `options`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": [f"Question {i}: " + "q" * 500 for i in range(rows)],
                      "completion": [f"Answer {i}: " + "a" * 500 for i in range(rows)]})
    pq.write_table(table, path, row_group_size=options.pop("row_group_size", rows), **options)
    return path


def test_sampled_parquet_reads_only_the_rows_that_fit_the_byte_budget(tmp_path, monkeypatch):
    """A row group larger than the server's sample bytes, in small pages: inspection without a model reads only
    the first rows that fit the budget (by the metadata's bytes per row), not the whole group; the total comes
    from the metadata. Small row groups are read whole until the budget is spent. Training reads every row."""
    import pyarrow.parquet as pq

    budget = 128 * 1024
    monkeypatch.setattr(inspect_module, "SAMPLE", readers.Prefix(rows=2_000, bytes=budget))
    path = _parquet(tmp_path / "one.parquet", 1_500, data_page_size=16 * 1024, write_batch_size=16,
                    use_dictionary=False)  # pages of about 16 KiB
    group = pq.ParquetFile(path).metadata.row_group(0)
    assert group.total_byte_size > 8 * budget
    answer = inspect_dataset(str(path), dataset_format="auto")
    fit = budget * group.num_rows // group.total_byte_size
    assert 0 < answer["rows"] == answer["usable_rows"] == answer["sampled"]["rows_read"] <= fit
    assert answer["sampled"]["rows_total"] == 1_500 and answer["problems"] == []
    assert answer["examples"][0].startswith("Question 0: ") and "of 1500" in answer["note"]

    groups = _parquet(tmp_path / "groups.parquet", 1_500, row_group_size=50)  # 50 KB each
    answer = inspect_dataset(str(groups), dataset_format="auto")
    per_row = pq.ParquetFile(groups).metadata.row_group(0).total_byte_size / 50
    assert 0 < answer["rows"] <= budget / per_row + 50 and answer["sampled"]["rows_total"] == 1_500
    for source in (path, groups):
        assert len(_prepare(str(source)).dataset) == 1_500


def pq_group_bytes(path):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.row_group(0).total_byte_size


def test_parquet_row_group_too_large_to_sample_is_not_read_in_the_server(tmp_path, monkeypatch):
    """A row group larger than the server may decode at once (pyarrow may read it whole, however few rows are
    asked for): inspection without a model reads no row and answers from the metadata (columns, format, row
    count), saying why and to pass model_id; training still reads it."""
    monkeypatch.setattr(inspect_module, "SAMPLE", readers.Prefix(rows=2_000, bytes=128 * 1024))
    monkeypatch.setattr(readers, "SERVER_ROW_GROUP_BYTES", 64 * 1024)
    path = _parquet(tmp_path / "d.parquet", 1_500, data_page_size=64 * readers.MiB, use_dictionary=False)
    assert pq_group_bytes(path) > 64 * 1024
    answer = inspect_dataset(str(path), dataset_format="auto")
    assert answer["rows"] == answer["usable_rows"] == 0 and answer["examples"] == []
    assert answer["columns"] == ["prompt", "completion"] and answer["format"] == "prompt_completion"
    assert answer["sampled"]["rows_read"] == 0 and answer["sampled"]["rows_total"] == 1_500
    problems = " ".join(answer["problems"])
    assert "first row group is too large to sample in the server" in problems and "pass model_id" in problems
    assert "model_id" in answer["note"]
    assert len(_prepare(str(path)).dataset) == 1_500


def test_json_array_syntax_error_is_named_not_taken_for_a_long_row(tmp_path, monkeypatch):
    """A JSON array item with a syntax error followed by more than the row cap: the error is named with the
    row's index and the parser's reason (not "longer than"), whether the file is read in one chunk or in tiny
    ones; a row cut off by the end of a chunk is still read, and an item truly over the cap still says so."""
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 64)
    rows = [{"text": "short"}, {"text": "fine"}]
    path = tmp_path / "d.json"
    path.write_text('[{"text": "short"}, {"text": "b" "c"},\n' + ",\n".join([json.dumps({"text": "x" * 20})] * 10)
                    + "]")
    for chunk in (readers.MiB, 8, 3):
        monkeypatch.setattr(readers, "_CHUNK", chunk)
        with pytest.raises(DatasetError) as err:
            _prepare(str(path))
        assert "row 1 is not valid JSON (Expecting ',' delimiter" in str(err.value), chunk
        assert "longer than" not in str(err.value)
        (tmp_path / "ok.json").write_text(json.dumps(rows + [{"text": -1.5e-7}, {"text": "tail"}]))
        with pytest.raises(DatasetError, match="row 2: text is a number"):
            _prepare(str(tmp_path / "ok.json"))
        (tmp_path / "long.json").write_text(json.dumps(rows + [{"text": "y" * 100}]))
        with pytest.raises(DatasetError, match="row 2 is longer than 64 bytes"):
            _prepare(str(tmp_path / "long.json"))


# -- should_stop ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def many_rows(tmp_path_factory) -> Path:
    """A file of 100,000 small rows: reading all of it takes many stop checks."""
    path = tmp_path_factory.mktemp("many") / "many.jsonl"
    return write_jsonl(path, [{"text": f"row {i}"} for i in range(100_000)])


def test_should_stop_ends_reading_at_the_next_check(many_rows):
    """Reading asks should_stop() every few hundred rows; the first True ends it with Cancelled naming the
    parameter, long before the end of the file."""
    stop = StopAfter(3)
    source = read_source(str(many_rows), param="train_dataset", should_stop=stop)
    with pytest.raises(Cancelled, match="reading train_dataset stopped"):
        for _ in source.rows:
            pass
    assert stop.calls == 3 and source.progress.rows_read <= 3 * readers.STOP_CHECK_ROWS
    stop = StopAfter(2)
    with pytest.raises(Cancelled, match="reading train_dataset stopped"):
        _prepare(str(many_rows), should_stop=stop)
    assert stop.calls == 2
    with pytest.raises(Cancelled, match="reading dataset stopped"):
        inspect_dataset(str(many_rows), dataset_format="auto", should_stop=StopAfter(1))


def test_should_stop_ends_reading_a_long_line_by_bytes(tmp_path):
    """Lines of a MiB each: the stop check counts bytes as well as rows."""
    path = write_jsonl(tmp_path / "wide.jsonl", [{"text": "w" * readers.MiB}] * 20)
    stop = StopAfter(2)
    source = read_source(str(path), param="train_dataset", should_stop=stop)
    with pytest.raises(Cancelled):
        for _ in source.rows:
            pass
    assert stop.calls == 2 and source.progress.rows_read <= 3


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_should_stop_ends_tokenizing(tokenizer):
    """Chat rows tokenized for training check should_stop too: a stop asked after reading ends the tokenizing."""
    rows = [{"messages": [USER, ASSISTANT]}] * (readers.STOP_CHECK_ROWS + 10)
    stop = StopAfter(2)  # call 1: reading's check at row 256; call 2: the tokenizing loop's first
    with pytest.raises(Cancelled, match="tokenizing train_dataset stopped"):
        prepare(rows, dataset_format="auto", chat_template=None, param="train_dataset", tokenizer=tokenizer,
                should_stop=stop)


# -- errors that point at the row ----------------------------------------------------------------------------------

def test_malformed_line_is_named_with_its_number_and_reason(tmp_path):
    """Line 17 of 32 not valid JSON: training refuses naming the file, line 17 and the parser's reason;
    inspection reports it; skip_invalid_rows trains on the 31 others and says so."""
    path = _malformed_at_17(tmp_path / "d.jsonl")
    with pytest.raises(DatasetError) as err:
        _prepare(str(path))
    assert f"train_dataset={str(path)!r} line 17: not valid JSON (Expecting ',' delimiter" in str(err.value)
    assert "skip_invalid_rows" in str(err.value)
    problems = " ".join(inspect_dataset(str(path), dataset_format="auto")["problems"])
    assert "1 of 32 rows are invalid" in problems and "line 17: not valid JSON" in problems
    got = _prepare(str(path), skip_invalid_rows=True)
    assert len(got.dataset) == 31 and any("skipped 1 of 32 invalid rows" in w and "line 17" in w
                                          for w in got.warnings)


@pytest.mark.parametrize(("content", "expected"), [
    ("", r"is empty \(0 bytes\)"),
    ("\n\n  \n", "has no rows"),
])
def test_empty_files_say_empty(tmp_path, content, expected):
    """An empty file, or one of blank lines only, is named as such, for training and inspection."""
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    for call in (lambda: _prepare(str(path)), lambda: inspect_dataset(str(path), dataset_format="auto")):
        with pytest.raises(DatasetError, match=expected):
            call()


def test_wrong_types_are_invalid_but_empty_fields_are_skipped():
    """A field of the wrong type is invalid (refused, naming the row and what is allowed); empty fields are
    skipped with a warning as before."""
    with pytest.raises(DatasetError, match="row 1: text is a number; a string is allowed"):
        _prepare([{"text": "fine"}, {"text": 5}])
    got = _prepare([{"text": "fine"}, {"text": "  "}])
    assert len(got.dataset) == 1 and "skipped 1 of 2 rows with empty fields" in got.warnings[0]
    with pytest.raises(DatasetError, match="row 1: is a str, not an object"):
        _prepare([{"text": "fine"}, "loose string"])


BAD_CHATS = {
    "two user turns": ({"messages": [USER, USER, ASSISTANT]}, "messages[0] and messages[1] are two user turns"),
    "two assistant turns": ({"messages": [USER, ASSISTANT, ASSISTANT]},
                            "messages[1] and messages[2] are two assistant turns"),
    "late system turn": ({"messages": [USER, SYSTEM, ASSISTANT]}, "messages[1] is a system turn after the first"),
    "answer first": ({"messages": [SYSTEM, ASSISTANT, USER, ASSISTANT]},
                     "messages[1] is an assistant turn before any user turn"),
    "unknown role": ({"messages": [USER, {"role": "bot", "content": "x"}]}, "messages[1] has role='bot'; allowed"),
    "no answer": ({"messages": [SYSTEM, USER]}, "has no assistant turn"),
    "content not text": ({"messages": [USER, {"role": "assistant", "content": None}]},
                         "messages[1].content is a null; a string is allowed"),
    "sharegpt unknown speaker": ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]},
                                 "conversations[1] has from='robot'"),
    "conversational prompt-completion": ({"prompt": [USER, USER], "completion": [ASSISTANT]},
                                         "prompt[0] and prompt[1] are two user turns"),
}


@pytest.mark.parametrize("kind", BAD_CHATS)
def test_bad_chat_rows_are_reported_refused_or_skipped(tmp_path, kind):
    """Each kind of broken chat row, at line 4 of 6: inspection reports it with the line, training refuses naming
    the line and the reason, and skip_invalid_rows trains on the other 5 and counts the one skipped."""
    bad, reason = BAD_CHATS[kind]
    key = next(iter(bad))
    good = {"messages": [SYSTEM, USER, ASSISTANT, {"role": "user", "content": "More?"}, ASSISTANT]}
    if key == "conversations":
        good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    elif key == "prompt":
        good = {"prompt": [SYSTEM, USER], "completion": [ASSISTANT]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good] * 3 + [bad] + [good] * 2)
    answer = inspect_dataset(str(path), dataset_format="auto")
    assert answer["rows"] == 6 and answer["usable_rows"] == 5
    assert f"line 4: {reason}" in " ".join(answer["problems"])
    with pytest.raises(DatasetError) as err:
        _prepare(str(path))
    assert f"line 4: {reason}" in str(err.value) and "train_dataset=" in str(err.value)
    got = _prepare(str(path), skip_invalid_rows=True)
    assert len(got.dataset) == 5 and any("skipped 1 of 6 invalid rows" in w for w in got.warnings)


def test_tool_turns_after_an_answer_are_fine():
    """An assistant turn calling a tool, the tool's answers, then the assistant again: no problem reported."""
    tool = {"role": "tool", "content": "42"}
    row = {"messages": [SYSTEM, USER, ASSISTANT, tool, tool, ASSISTANT, {"role": "user", "content": "ok"}, ASSISTANT]}
    assert inspect_dataset([row], dataset_format="auto")["problems"] == []
    assert len(_prepare([row]).dataset) == 1


def test_inline_rows_are_named_by_index():
    """Inline rows are named by their index in the list."""
    rows = [{"messages": [USER, ASSISTANT]}] * 3 + [{"messages": [ASSISTANT]}]
    with pytest.raises(DatasetError, match=r"^train_dataset row 3: messages\[0\] is an assistant turn"):
        _prepare(rows)


@pytest.mark.parametrize("first", ["plain", "conversational"])
def test_mixed_prompt_completion_shapes_are_invalid_rows(tmp_path, first):
    """Prompt/completion rows as strings and as lists of messages in one file: the first usable row fixes the
    shape, a row of the other shape is an invalid row named with its line and the reason (refused by training,
    skipped with skip_invalid_rows, listed by inspection), never a row of None nor a bare KeyError."""
    plain = {"prompt": "Hi?", "completion": "Hello."}
    chat = {"prompt": [USER], "completion": [ASSISTANT]}
    shape, other = (plain, chat) if first == "plain" else (chat, plain)
    empty = {"prompt": other["prompt"], "completion": ""}  # line 1: empty, so line 2 is the first usable row
    path = write_jsonl(tmp_path / "d.jsonl", [empty, shape, shape, other, shape])
    reason = ("line 4: is a conversational prompt/completion row among plain-text ones; use one shape"
              if first == "plain" else
              "line 4: is a plain-text prompt/completion row among conversational ones; use one shape")
    with pytest.raises(DatasetError) as err:
        _prepare(str(path))
    assert reason in str(err.value) and "first usable row, line 2" in str(err.value)
    assert "skip_invalid_rows=true in training_config" in str(err.value)
    answer = inspect_dataset(str(path), dataset_format="auto")
    assert answer["rows"] == 5 and answer["usable_rows"] == 3 and reason in " ".join(answer["problems"])
    got = _prepare(str(path), skip_invalid_rows=True)
    assert len(got.dataset) == 3 and any("skipped 1 of 5 invalid rows" in w and "line 4" in w for w in got.warnings)
    expected = [plain] * 3 if first == "plain" else [{"prompt": [USER], "completion": [ASSISTANT]}] * 3
    assert got.dataset.to_list() == expected
    with pytest.raises(DatasetError, match=r"row 2: is a (conversational|plain-text) prompt/completion row"):
        _prepare([shape, shape, other])  # inline rows alike


def test_developer_role_is_a_system_turn_and_unknown_roles_say_how_to_skip():
    """OpenAI's `developer` role is taken as a system turn (opening a conversation only); an unknown role is
    still refused, the refusal naming the row, the roles allowed and skip_invalid_rows=true in training_config."""
    developer = {"role": "developer", "content": "Be brief."}
    got = _prepare([{"messages": [developer, USER, ASSISTANT]}])
    assert got.dataset.to_list() == [{"prompt": [SYSTEM, USER], "completion": [ASSISTANT]}]
    assert inspect_dataset([{"messages": [developer, USER, ASSISTANT]}], dataset_format="auto")["problems"] == []
    with pytest.raises(DatasetError, match=r"row 0: messages\[1\] is a system turn after the first turn"):
        _prepare([{"messages": [USER, developer, ASSISTANT]}])
    with pytest.raises(DatasetError) as err:
        _prepare([{"messages": [USER, ASSISTANT]}, {"messages": [{"role": "bot", "content": "x"}, ASSISTANT]}])
    message = str(err.value)
    assert "row 1: messages[0] has role='bot'; allowed: 'system', 'user', 'assistant', 'tool'" in message
    assert "'developer' for 'system'" in message and "skip_invalid_rows=true in training_config" in message
    problems = " ".join(inspect_dataset([{"messages": [{"role": "bot", "content": "x"}, ASSISTANT]}],
                                        dataset_format="auto")["problems"])
    assert "role='bot'" in problems and "skip_invalid_rows=true in training_config" in problems


# -- through the MCP client, on the server ------------------------------------------------------------------------

CLEAR_REFS, STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        lines = STATUS.read_text().splitlines()
    except OSError:
        return None
    values = [int(line.split()[1]) for line in lines if line.startswith(f"{field}:")]
    return values[0] if values else None


def _reset_peak_rss_or_skip() -> None:
    """Reset this process's peak RSS (VmHWM) so that a peak measured next is this test's; skips the test where
    Linux does not allow it (the peak would be an earlier test's, and a memory check could not fail)."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError as exc:
        pytest.skip(f"peak memory cannot be reset here ({CLEAR_REFS}: {exc.strerror or exc}), so it cannot be "
                    f"measured for this test alone")
    peak, now = _status_kib("VmHWM"), _status_kib("VmRSS")
    if peak is None or now is None:
        pytest.skip(f"peak memory cannot be measured here ({STATUS} has no VmHWM/VmRSS)")
    if peak > now + 64 * 1024:
        pytest.skip(f"peak memory was not reset by {CLEAR_REFS} (VmHWM {peak} KiB, VmRSS {now} KiB)")


def _peak_rss_bytes() -> int:
    peak = _status_kib("VmHWM")
    assert peak is not None, "VmHWM was there when the peak was reset"
    return peak * 1024


def test_peak_memory_check_skips_where_the_peak_cannot_be_reset(monkeypatch, tmp_path):
    """Where /proc/self/clear_refs cannot be written (or VmHWM is missing) the memory test skips, saying why,
    instead of comparing against an earlier test's peak and passing whatever happened."""
    monkeypatch.setattr(__import__(__name__), "CLEAR_REFS", tmp_path / "no such folder" / "clear_refs")
    with pytest.raises(pytest.skip.Exception, match="peak memory cannot be reset here"):
        _reset_peak_rss_or_skip()
    monkeypatch.setattr(__import__(__name__), "CLEAR_REFS", tmp_path / "clear_refs")
    monkeypatch.setattr(__import__(__name__), "STATUS", tmp_path / "status")
    (tmp_path / "status").write_text("Name:\tpython\n")
    with pytest.raises(pytest.skip.Exception, match="peak memory cannot be measured here"):
        _reset_peak_rss_or_skip()


def test_server_inspects_a_sparse_2gb_file_with_flat_memory(mcp, workspace):
    """inspect_dataset without a model runs in the server process: on a 2 GB file it answers from a bounded
    prefix, and the server's peak memory grows by far less than the file."""
    path = write_jsonl(workspace / "huge.jsonl", ROWS)
    os.truncate(path, SPARSE_BYTES)
    _reset_peak_rss_or_skip()
    before = _peak_rss_bytes()
    answer = mcp.ok("inspect_dataset", {"dataset": "huge.jsonl"})
    grown = _peak_rss_bytes() - before
    assert answer["rows"] == 32 and answer["sampled"]["file_bytes"] == SPARSE_BYTES
    assert answer["sampled"]["bytes_read"] < SPARSE_BYTES // 100
    assert grown < 200 * 1024 * 1024, f"server peak memory grew by {grown} bytes"
    path.unlink()


def test_server_names_faults_through_the_tool(mcp, workspace, monkeypatch):
    """Through the MCP client: a malformed line is reported with its number, an empty file is named empty, a file
    over the byte limit is refused naming the limit and the server option."""
    _malformed_at_17(workspace / "bad.jsonl")
    problems = " ".join(mcp.ok("inspect_dataset", {"dataset": "bad.jsonl"})["problems"])
    assert "line 17: not valid JSON" in problems
    (workspace / "empty.jsonl").write_text("")
    assert "is empty (0 bytes)" in mcp.error("inspect_dataset", {"dataset": "empty.jsonl"})
    monkeypatch.setenv(readers.BYTES_ENV, "100")
    text = mcp.error("inspect_dataset", {"dataset": "bad.jsonl"})
    assert "bad.jsonl" in text and "100 bytes" in text and "--max-dataset-bytes" in text
