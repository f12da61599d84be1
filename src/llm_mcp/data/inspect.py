"""Look at a dataset the way training will see it, before spending a run on it: detected format, rows, columns,
two examples rendered with the model's chat template and the trained part marked, token length statistics, rows
that max_length would cut, and concrete problems (unusable rows, mixed formats, a missing EOS, duplicates).

Without a tokenizer (no model_id) it runs in the server process and must not import torch nor hold a dataset:
it reads only the start of a file or folder (SAMPLE, said in the answer's `sampled`), shows examples in a generic
layout and counts lengths in characters. With one (in the model's worker) it reads every row, keeping only the
first MAX_ROWS_MEASURED for examples and lengths.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from llm_mcp.data.chat_templates import choice_of, end_of_turn_token, summary, trained_runs
from llm_mcp.data.datasets import CheckedRow, CheckedRows, Tally, chosen_format, read_source, to_training_rows
from llm_mcp.data.readers import MiB, Prefix, ReadProgress, TooLargeToSample
from llm_mcp.data.rows import PREFERENCE, PROMPT_ANSWER, UNPAIRED, loss_on, row_format
from llm_mcp.errors import DatasetError

TRAIN_START, TRAIN_END = "[[TRAIN]]", "[[/TRAIN]]"  # marks the trained part of a rendered example
MAX_ROWS_MEASURED = 20_000
SAMPLE = Prefix(rows=2_000, bytes=32 * MiB)  # what the server process reads of a dataset (no model given)
_EXAMPLES = 2
_CHAT_FORMATS = ("messages", "sharegpt", "alpaca")


def inspect_dataset(source: Any, *, dataset_format: str, tokenizer: Any = None, max_length: int | None = None,
                    should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """What training would see and refuse in a dataset. With a tokenizer (in a model's worker) every row is read;
    without one (in the server) only the start of a file or folder, said in `sampled`."""
    source_rows = read_source(source, param="dataset", should_stop=should_stop,
                              prefix=None if tokenizer is not None else SAMPLE)
    try:
        rows = CheckedRows(source_rows, dataset_format=dataset_format)
    except TooLargeToSample as exc:  # not one row read: what the file's metadata says, and where to read it
        return _not_sampled(exc, source_rows.name, source_rows.progress, dataset_format)
    survey = _survey(rows)
    problems = survey.problems(rows.fmt)
    answer: dict[str, Any] = {
        "status": "success",
        "format": rows.fmt,
        "rows": survey.rows,
        "usable_rows": survey.usable_count,
        "columns": rows.columns,
        "loss_on": loss_on(rows.fmt),
    }
    notes = []
    if not source_rows.progress.complete:
        answer["sampled"] = _sampled(source_rows.progress)
        notes.append(_sample_note(source_rows.progress))
    if not survey.usable:
        return {**answer, "examples": [], "problems": problems, **_note(notes)}
    problems += _method_problems(rows.fmt, survey.usable)
    if tokenizer is None or rows.fmt in (PREFERENCE, UNPAIRED, PROMPT_ANSWER):  # shown as they are; lengths of the
        # prompt + the longer answer
        answer["examples"] = [_plain(r) for r in survey.usable[:_EXAMPLES]]
        if tokenizer is not None:
            answer["length_tokens"] = _stats([_count(tokenizer, _pair_text(r)) for r in survey.usable])
            return {**answer, "problems": problems, **_note(notes)}
        answer["length_chars"] = _stats([len(_plain(r)) for r in survey.usable])
        notes.append("Pass model_id to render with the model's chat template and count tokens"
                     f"{', reading every row in its worker' if 'sampled' in answer else ''}.")
        return {**answer, "problems": problems, **_note(notes)}
    answer.update(_as_trained(survey, rows.fmt, tokenizer, max_length, problems))
    return {**answer, "problems": problems, **_note(notes)}


@dataclass
class _Survey:
    """What reading every row (or the prefix) found: counts, the rows measured, and what is wrong."""

    rows: int = 0
    usable_count: int = 0
    usable: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_ROWS_MEASURED usable rows
    labels: list[str] = field(default_factory=list)  # where each of those is
    empty: Tally = field(default_factory=Tally)
    invalid: Tally = field(default_factory=Tally)
    formats: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    seen: set[int] = field(default_factory=set)  # hashes of the first MAX_ROWS_MEASURED rows, for duplicates
    stopped: str | None = None  # why reading ended before the end of the file

    def add(self, row: CheckedRow) -> None:
        self.rows += 1
        if row.raw is not None:
            kind = row_format(row.raw) or "unknown"
            self.formats[kind] = self.formats.get(kind, 0) + 1
            self._count_duplicate(row.raw)
        if row.problem is not None:
            self.invalid.add(f"{row.where}: {row.problem}")
        elif row.converted is None:
            self.empty.add(row.where)
        else:
            self.usable_count += 1
            if len(self.usable) < MAX_ROWS_MEASURED:
                self.usable.append(row.converted)
                self.labels.append(row.where)

    def _count_duplicate(self, raw: dict[str, Any]) -> None:
        key = hash(json.dumps(raw, sort_keys=True, default=str))  # a hash: long rows are not kept twice
        if key in self.seen:
            self.duplicates += 1
        elif len(self.seen) < MAX_ROWS_MEASURED:  # bounded memory: later rows are compared with these only
            self.seen.add(key)

    def problems(self, fmt: str) -> list[str]:
        found = []
        if self.stopped:
            found.append(f"{self.stopped} The {self.rows} rows before it are inspected here; training refuses the "
                         f"file as it is.")
        if self.invalid.count:
            found.append(f"{self.invalid.count} of {self.rows} rows are invalid, so training would refuse the "
                         f"dataset (or skip them with skip_invalid_rows=true in training_config): "
                         f"{'; '.join(self.invalid.first)}"
                         f"{'; ...' if self.invalid.count > len(self.invalid.first) else ''}.")
        if self.empty.count:
            found.append(f"{self.empty.count} of {self.rows} rows have empty fields for format {fmt!r} and would be "
                         f"skipped (first: {', '.join(self.empty.first)}).")
        if len(self.formats) > 1:
            found.append(f"mixed row formats: {self.formats}; training uses {fmt!r} for every row, so the others "
                         f"would be skipped or misread. Split them or convert them to one format.")
        if self.duplicates:
            found.append(f"{self.duplicates} rows are exact duplicates of an earlier row.")
        return found


def _survey(rows: CheckedRows) -> _Survey:
    """Every row read through the survey; a file that cannot be read past some row is a problem, not an error,
    once rows before it were read."""
    survey = _Survey()
    try:
        for row in rows:
            survey.add(row)
    except DatasetError as exc:
        if survey.rows == 0:
            raise
        survey.stopped = str(exc)
    return survey


def _not_sampled(exc: TooLargeToSample, name: str, progress: ReadProgress, dataset_format: str) -> dict[str, Any]:
    fmt = chosen_format(exc.columns, dataset_format, name)
    return {"status": "success", "format": fmt, "rows": 0, "usable_rows": 0, "columns": exc.columns,
            "loss_on": "answers only" if fmt != "text" else "all tokens", "sampled": _sampled(progress),
            "examples": [], "problems": [str(exc)],
            "note": f"No row was read: the file has {exc.rows_total} rows (its metadata says) but its first row "
                    f"group cannot be sampled within the server's {SAMPLE.bytes} bytes. Pass model_id to read "
                    f"every row in the model's worker."}


def _sampled(progress: ReadProgress) -> dict[str, Any]:
    return {"rows_read": progress.rows_read, "bytes_read": progress.bytes_read, "file_bytes": progress.file_bytes,
            "rows_total": progress.rows_total}


def _sample_note(progress: ReadProgress) -> str:
    read = f"the first {progress.rows_read} rows"
    if progress.bytes_read is not None and progress.file_bytes is not None:
        read += f" ({progress.bytes_read} of {progress.file_bytes} bytes)"
    total = (f"of {progress.rows_total}" if progress.rows_total is not None
             else "the total row count is not known without reading the whole file")
    return (f"Only {read} were read, {total}: without a model the server reads the start of a dataset, never all "
            f"of it.")


def _note(notes: list[str]) -> dict[str, str]:
    return {"note": " ".join(notes)} if notes else {}


def _as_trained(survey: _Survey, fmt: str, tokenizer: Any, max_length: int | None,
                problems: list[str]) -> dict[str, Any]:
    """Examples, token lengths and trained tokens as training prepares the rows; problems found on the way."""
    chat_template = getattr(tokenizer, "chat_template", None)
    examples = to_training_rows(survey.usable, fmt, chat_template, tokenizer, labels=survey.labels)
    rendered = [_render(example, tokenizer) for example in examples.dataset]
    lengths = [r.tokens for r in rendered]
    out: dict[str, Any] = {"examples": [r.marked for r in rendered[:_EXAMPLES]], "length_tokens": _stats(lengths),
                           "trained_tokens": sum(r.trained_tokens for r in rendered)}
    if fmt in _CHAT_FORMATS:
        out["chat_template"] = summary(tokenizer)
    if survey.usable_count > len(survey.usable):
        out["length_tokens"]["measured_rows"] = len(survey.usable)
    if max_length is not None:
        cut = sum(n > max_length for n in lengths)
        out["max_length"] = max_length
        out["truncated_rows"] = cut
        if cut:
            problems.append(f"{cut} rows are longer than max_length={max_length} tokens and would be cut "
                            f"(their answers partly or wholly lost); load with a larger max_length or shorten "
                            f"them.")
    stops = [t for t in dict.fromkeys([tokenizer.eos_token, end_of_turn_token(tokenizer)]) if t]
    missing_stop = sum(not all(part.rstrip().endswith(tuple(stops)) for part in r.trained) for r in rendered)
    if missing_stop:
        problems.append(f"{missing_stop} rows have a trained part that does not end with "
                        f"{' or '.join(repr(t) for t in stops)}, so the model may not learn to stop; fix the chat "
                        f"template (it should end assistant turns with {stops[-1]!r}).")
    problems += _template_problems(fmt, tokenizer, chat_template, examples.warnings)
    return out


@dataclass(frozen=True)
class _Rendered:
    marked: str  # the example as the model sees it, trained parts between TRAIN markers
    trained: list[str]  # each trained part (one per assistant turn in chat rows)
    tokens: int
    trained_tokens: int


def _render(prepared: dict[str, Any], tokenizer: Any) -> _Rendered:
    """One example in TRL's columns as training sees it: EOS after a text or an answer, the prompt masked, and
    for chat rows the assistant mask training uses (the template's generation markers through transformers, or
    the engine's mask: data/chat_templates.py)."""
    eos = tokenizer.eos_token
    if "text" in prepared:
        text = prepared["text"] if prepared["text"].endswith(eos) else prepared["text"] + eos
        n = _count(tokenizer, text)
        return _Rendered(TRAIN_START + text + TRAIN_END, [text], n, n)
    if "input_ids" in prepared:  # chat rows tokenized with the engine's assistant mask
        return _from_tokens(tokenizer, prepared["input_ids"], [int(label != -100) for label in prepared["labels"]])
    if "messages" in prepared:  # the template marks assistant turns: transformers masks them
        out = tokenizer.apply_chat_template(prepared["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return _from_tokens(tokenizer, out["input_ids"], out["assistant_masks"])
    prompt_text, completion_text = prepared["prompt"], prepared["completion"]
    if not completion_text.rstrip().endswith(eos):
        completion_text += eos
    text = prompt_text + completion_text
    return _Rendered(prompt_text + TRAIN_START + completion_text + TRAIN_END, [completion_text],
                     _count(tokenizer, text), _count(tokenizer, completion_text))


def _from_tokens(tokenizer: Any, ids: list[int], mask: list[int]) -> _Rendered:
    """Token runs decoded in order, the trained ones between TRAIN markers."""
    parts, at = [], 0
    while at < len(ids):
        end = at
        while end < len(ids) and bool(mask[end]) == bool(mask[at]):
            end += 1
        text = tokenizer.decode(ids[at:end])
        parts.append(TRAIN_START + text + TRAIN_END if mask[at] else text)
        at = end
    trained = [tokenizer.decode(run) for run in trained_runs(ids, mask)]
    return _Rendered("".join(parts), trained, len(ids), int(sum(bool(m) for m in mask)))


def _template_problems(fmt: str, tokenizer: Any, chat_template: Any, notes: list[str]) -> list[str]:
    if fmt not in _CHAT_FORMATS:
        return []
    problems = list(notes)
    choice = choice_of(tokenizer)
    if choice is not None and choice.source == "fallback":
        problems.append("the model's tokenizer has no chat template of its own: chat rows are rendered with the "
                        "server's fallback ChatML (chat_template='chatml'), which a base model knows only once "
                        "trained on it. Load with chat_template (a name or a Jinja string) to choose another.")
    elif not chat_template:
        problems.append("the tokenizer has no chat template; load the model through *_load_model, which applies "
                        "one (chat_template).")
    return problems


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _flat(value: Any) -> str:
    return value if isinstance(value, str) else "\n".join(f"{m['role']}: {m['content']}" for m in value)


def _pair_text(row: dict[str, Any]) -> str:
    if "chosen" in row:
        return _flat(row["prompt"]) + max(_flat(row["chosen"]), _flat(row["rejected"]), key=len)
    return _flat(row["prompt"]) + _flat(row.get("completion") or row.get("answer") or "")


def _method_problems(fmt: str, usable: list[dict[str, Any]]) -> list[str]:
    """What a preference method would make of these rows: kto needs both kinds of label to learn a contrast."""
    if fmt != UNPAIRED or not usable:
        return []
    labels = {r["label"] for r in usable}
    if len(labels) == 1:
        return [f"every row is labelled {str(labels.pop()).lower()}; kto learns from desirable (true) and "
                f"undesirable (false) completions, so add some of the other kind."]
    return []


def _plain(row: dict[str, Any]) -> str:
    if "chosen" in row:  # a preference pair: the chosen answer is trained toward, the rejected one away from
        return (f"{_flat(row['prompt'])}{TRAIN_START}chosen: {_flat(row['chosen'])}{TRAIN_END} "
                f"{TRAIN_START}rejected: {_flat(row['rejected'])}{TRAIN_END}")
    if "label" in row:  # kto: toward a desirable completion, away from an undesirable one
        return (f"{_flat(row['prompt'])}{TRAIN_START}{'desirable' if row['label'] else 'undesirable'}: "
                f"{_flat(row['completion'])}{TRAIN_END}")
    if "answer" in row:  # grpo: the model writes the completion; the answer is what the rewards compare it with
        return f"{_flat(row['prompt'])}{TRAIN_START}(generated; reference answer: {row['answer']}){TRAIN_END}"
    if "text" in row:
        return row["text"]
    if "messages" in row:
        turns = row["messages"]
        shown = [f"{m['role']}: {m['content']}" for m in turns[:-1]]
        return "\n".join(shown + [f"{turns[-1]['role']}: {TRAIN_START}{turns[-1]['content']}{TRAIN_END}"])
    return f"{row['prompt']}{TRAIN_START}{row['completion']}{TRAIN_END}"


def _stats(values: list[int]) -> dict[str, Any]:
    ordered = sorted(values)
    return {"min": ordered[0], "mean": round(statistics.fmean(ordered), 1), "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1],
            "total": sum(ordered)}
