"""Look at a dataset the way training will see it, before spending a run on it: detected format, rows, columns,
two examples rendered with the model's chat template and the trained part marked, token length statistics, rows
that max_length would cut, and concrete problems (unusable rows, mixed formats, a missing EOS, duplicates).

Without a tokenizer (no model_id) it runs in the server process and must not import torch: examples are then
shown in a generic layout and lengths counted in characters.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from llm_mcp.data.datasets import convert_rows, read_source, row_format, to_training_rows

TRAIN_START, TRAIN_END = "[[TRAIN]]", "[[/TRAIN]]"  # marks the trained part of a rendered example
MAX_ROWS_MEASURED = 20_000
_EXAMPLES = 2


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
    rendered = None
    if tokenizer is not None:
        examples = to_training_rows(usable[:MAX_ROWS_MEASURED], fmt, getattr(tokenizer, "chat_template", None))
        rendered = [_render(example, tokenizer) for example in examples.dataset]
    if rendered is None:
        answer["examples"] = [_plain(r) for r in usable[:_EXAMPLES]]
        answer["length_chars"] = _stats([len(_plain(r)) for r in usable[:MAX_ROWS_MEASURED]])
        answer["note"] = "Pass model_id to render with the model's chat template and count tokens."
    else:
        chat_template = getattr(tokenizer, "chat_template", None)
        answer["examples"] = [_marked(text, trained) for text, trained, _ in rendered[:_EXAMPLES]]
        lengths = [n for _, _, n in rendered]
        answer["length_tokens"] = _stats(lengths)
        answer["trained_tokens"] = sum(len(tokenizer(t, add_special_tokens=False).input_ids)
                                       for _, t, _ in rendered)
        if len(usable) > MAX_ROWS_MEASURED:
            answer["length_tokens"]["measured_rows"] = MAX_ROWS_MEASURED
        if max_length is not None:
            cut = sum(n > max_length for n in lengths)
            answer["max_length"] = max_length
            answer["truncated_rows"] = cut
            if cut:
                problems.append(f"{cut} rows are longer than max_length={max_length} tokens and would be cut "
                                f"(their answers partly or wholly lost); load with a larger max_length or shorten "
                                f"them.")
        eos = tokenizer.eos_token
        missing_eos = sum(not trained.rstrip().endswith(eos) for _, trained, _ in rendered)
        if missing_eos:
            problems.append(f"{missing_eos} rows' trained part does not end with the EOS token {eos!r}, so the "
                            f"model may not learn to stop; fix the chat template (it should end assistant turns "
                            f"with {eos!r}).")
        if fmt in ("messages", "sharegpt", "alpaca") and not chat_template:
            problems.append("the tokenizer has no chat template; training applies the server's default ChatML.")
    answer["problems"] = problems
    return answer


def _row_formats(raw: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in raw:
        kind = row_format(row) or "unknown"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _render(prepared: dict[str, Any], tokenizer: Any) -> tuple[str, str, int]:
    """(full text, trained part, token count) of one example in TRL's columns, as TRL builds it: EOS after the
    answer, prompt masked."""
    eos = tokenizer.eos_token
    if "text" in prepared:
        text = prepared["text"] if prepared["text"].endswith(eos) else prepared["text"] + eos
        return text, text, _count(tokenizer, text)
    if "messages" in prepared:  # the template marks assistant turns: train on all of them
        out = tokenizer.apply_chat_template(prepared["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = out["input_ids"], out["assistant_masks"]
        trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        text = tokenizer.decode(ids)
        return text, trained, len(ids)
    prompt, completion = prepared["prompt"], prepared["completion"]
    if isinstance(prompt, list):  # conversational: TRL renders the prompt with the generation prompt
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        completion_text = full[len(prompt_text):] if full.startswith(prompt_text) else completion[0]["content"]
    else:
        prompt_text, completion_text = prompt, completion
    if not completion_text.rstrip().endswith(eos):
        completion_text += eos
    text = prompt_text + completion_text
    return text, completion_text, _count(tokenizer, text)


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _marked(text: str, trained: str) -> str:
    """The example with its trained part(s) between TRAIN markers."""
    if trained and text.endswith(trained):
        return text[: len(text) - len(trained)] + TRAIN_START + trained + TRAIN_END
    at = text.find(trained) if trained else -1
    if at < 0:
        return text + f"\n{TRAIN_START}{trained}{TRAIN_END}"
    return text[:at] + TRAIN_START + trained + TRAIN_END + text[at + len(trained):]


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
