"""Look at a dataset the way training will see it, before spending a run on it: detected format, rows, columns,
two examples rendered with the model's chat template and the trained part marked, token length statistics, rows
that max_length would cut, and concrete problems (unusable rows, mixed formats, a missing EOS, duplicates).

Without a tokenizer (no model_id) it runs in the server process and must not import torch: examples are then
shown in a generic layout and lengths counted in characters.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any

from llm_mcp.data.chat_templates import choice_of, end_of_turn_token, summary, trained_runs
from llm_mcp.data.datasets import convert_rows, read_source, row_format, to_training_rows

TRAIN_START, TRAIN_END = "[[TRAIN]]", "[[/TRAIN]]"  # marks the trained part of a rendered example
MAX_ROWS_MEASURED = 20_000
_EXAMPLES = 2
_CHAT_FORMATS = ("messages", "sharegpt", "alpaca")


def inspect_dataset(source: Any, *, dataset_format: str, tokenizer: Any = None,
                    max_length: int | None = None) -> dict[str, Any]:
    raw = read_source(source, param="dataset")
    fmt, converted = convert_rows(raw, dataset_format=dataset_format, param="dataset")
    problems: list[str] = []
    unusable = [i for i, r in enumerate(converted) if r is None]
    if unusable:
        problems.append(f"{len(unusable)} of {len(converted)} rows have empty or malformed fields for format "
                        f"{fmt!r} and would be skipped (first row indexes: {unusable[:10]}).")
    formats = _row_formats(raw) if isinstance(source, list) else {}
    if len(formats) > 1:
        problems.append(f"mixed row formats: {formats}; training uses {fmt!r} for every row, so the others would "
                        f"be skipped or misread. Split them or convert them to one format.")
    duplicates = len(raw) - len({json.dumps(row, sort_keys=True, default=str) for row in raw})
    if duplicates:
        problems.append(f"{duplicates} rows are exact duplicates of an earlier row.")
    usable = [r for r in converted if r is not None]
    answer: dict[str, Any] = {
        "status": "success",
        "format": fmt,
        "rows": len(raw),
        "usable_rows": len(usable),
        "columns": raw.column_names,
        "loss_on": "answers only" if fmt != "text" else "all tokens",
    }
    if not usable:
        return {**answer, "examples": [], "problems": problems}
    if tokenizer is None:
        answer["examples"] = [_plain(r) for r in usable[:_EXAMPLES]]
        answer["length_chars"] = _stats([len(_plain(r)) for r in usable[:MAX_ROWS_MEASURED]])
        answer["note"] = "Pass model_id to render with the model's chat template and count tokens."
        answer["problems"] = problems
        return answer
    answer.update(_as_trained(usable, fmt, tokenizer, max_length, problems))
    answer["problems"] = problems
    return answer


def _as_trained(usable: list[dict[str, Any]], fmt: str, tokenizer: Any, max_length: int | None,
                problems: list[str]) -> dict[str, Any]:
    """Examples, token lengths and trained tokens as training prepares the rows; problems found on the way."""
    chat_template = getattr(tokenizer, "chat_template", None)
    examples = to_training_rows(usable[:MAX_ROWS_MEASURED], fmt, chat_template, tokenizer)
    rendered = [_render(example, tokenizer) for example in examples.dataset]
    lengths = [r.tokens for r in rendered]
    out: dict[str, Any] = {"examples": [r.marked for r in rendered[:_EXAMPLES]], "length_tokens": _stats(lengths),
                           "trained_tokens": sum(r.trained_tokens for r in rendered)}
    if fmt in _CHAT_FORMATS:
        out["chat_template"] = summary(tokenizer)
    if len(usable) > MAX_ROWS_MEASURED:
        out["length_tokens"]["measured_rows"] = MAX_ROWS_MEASURED
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


def _row_formats(raw: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in raw:
        kind = row_format(row) or "unknown"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


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


def _plain(row: dict[str, Any]) -> str:
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
