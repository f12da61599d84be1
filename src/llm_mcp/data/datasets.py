"""Read a dataset from what MCP can carry (a file path, a saved-dataset folder, a hub id, inline records), detect
its row format, and shape it into the columns TRL's SFTTrainer trains on.

Formats: text, alpaca (instruction/input/output), prompt_completion, messages (and ShareGPT `conversations`).
Prompt/completion, Alpaca and chat rows train on the answer only. TRL tokenizes, except chat rows whose template
has no `{% generation %}` markers: those are tokenized here with the assistant mask of data/chat_templates.py
(every assistant turn and its end-of-turn token) and given to TRL as pre-tokenized input_ids + labels (-100 off
the mask), which TRL truncates and packs as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from llm_mcp.data.chat_templates import has_generation_marks, tokenize_chat
from llm_mcp.errors import DatasetError
from llm_mcp.paths import stat_kind

log = logging.getLogger(__name__)

FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
FORMATS_HELP = (
    "rows with 'text'; or 'instruction' + 'output' (+ optional 'input', Alpaca); or 'prompt' + 'completion'; "
    "or 'messages' (a list of {role, content}); or ShareGPT 'conversations' (a list of {from, value})"
)
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "model": "assistant"}


@dataclass
class PreparedDataset:
    """A dataset in TRL's columns, with what was detected and done to it."""

    dataset: Any  # datasets.Dataset with text | prompt+completion | messages | input_ids+labels
    source_format: str
    assistant_only_loss: bool = False  # TRL masks by the template's {% generation %} markers
    tokenized: bool = False  # input_ids + labels, masked here
    warnings: list[str] = field(default_factory=list)


def read_source(source: str | list[dict[str, Any]], *, param: str) -> Any:
    """Anything MCP can carry -> datasets.Dataset (not yet validated)."""
    import datasets

    if isinstance(source, list):
        if not source:
            raise DatasetError(f"{param} is an empty list; give at least one row ({FORMATS_HELP}).")
        if not all(isinstance(row, dict) for row in source):
            raise DatasetError(f"{param}: every inline row must be a JSON object ({FORMATS_HELP}).")
        try:
            return datasets.Dataset.from_list(source)
        except Exception as exc:  # arrow cannot unify the rows' types
            raise DatasetError(f"{param}: inline rows have inconsistent fields or types ({exc}).") from None
    if not isinstance(source, str) or not source.strip():
        raise DatasetError(f"{param} must be a file path, a saved-dataset folder, a hub id, or a list of rows.")
    path = Path(source).expanduser()
    kind = stat_kind(path)
    if kind == "dir":
        return _read_folder(path, param)
    if kind == "file":
        return _read_file(path, param)
    if path.suffix.lower() in FILE_TYPES or source.startswith((".", "/", "~")):
        raise DatasetError(f"{param}={source!r}: no such file or folder (relative paths start at the workspace).")
    return _read_hub(source, param)


def _read_file(path: Path, param: str) -> Any:
    import datasets

    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(f"{param}={str(path)!r}: unsupported file type {path.suffix!r}; "
                           f"use one of {sorted(FILE_TYPES)} or a datasets.save_to_disk folder.")
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:
        raise DatasetError(f"{param}={str(path)!r} could not be read as {kind}: {exc}") from None


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


def detect_format(columns: list[str]) -> str | None:
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols:
        return "text"
    return None


def prepare(source: str | list[dict[str, Any]], *, dataset_format: str, chat_template: str | None,
            param: str, tokenizer: Any = None, should_stop: Callable[[], bool] | None = None,
            skip_invalid_rows: bool = False) -> PreparedDataset:
    """Read, detect, check and convert a dataset for SFTTrainer; errors name the columns found. With the model's
    tokenizer, chat rows train on every assistant turn whatever the template."""
    fmt, rows = convert_rows(read_source(source, param=param), dataset_format=dataset_format, param=param)
    usable = [r for r in rows if r is not None]
    if not usable:
        raise DatasetError(f"{param}: none of its {len(rows)} rows has usable content for format {fmt!r}; "
                           f"check for empty fields.")
    warnings = []
    if len(usable) < len(rows):
        warnings.append(f"{param}: skipped {len(rows) - len(usable)} of {len(rows)} rows with empty or "
                        f"malformed fields.")
    return _to_trl(usable, fmt, chat_template, warnings, tokenizer, param)


def convert_rows(raw: Any, *, dataset_format: str, param: str) -> tuple[str, list[dict[str, Any] | None]]:
    """The format (detected, or the one asked for) and each raw row converted to TRL's columns, None where the
    row is unusable."""
    if len(raw) == 0:
        raise DatasetError(f"{param} has no rows.")
    found = detect_format(raw.column_names)
    fmt = found if dataset_format == "auto" else ("sharegpt" if dataset_format == "messages" and found == "sharegpt"
                                                  else dataset_format)
    if fmt is None or not _has_columns(raw.column_names, fmt):
        raise DatasetError(f"{param}: columns {raw.column_names} match no known format"
                           f"{'' if dataset_format == 'auto' else f' (dataset_format={dataset_format!r})'}; "
                           f"expected {FORMATS_HELP}.")
    return fmt, [_convert(row, fmt) for row in raw]


def row_format(row: dict[str, Any]) -> str | None:
    """The format a single row's non-empty fields fit (rows of inline lists share the union of all columns)."""
    return detect_format([k for k, v in row.items() if v not in (None, "", [])])


def to_training_rows(rows: list[dict[str, Any]], fmt: str, chat_template: str | None,
                     tokenizer: Any = None) -> PreparedDataset:
    """Converted rows -> the dataset SFTTrainer gets (chat rows may become pre-tokenized rows)."""
    return _to_trl(rows, fmt, chat_template, [], tokenizer, "dataset")


def _has_columns(columns: list[str], fmt: str) -> bool:
    need = {"text": {"text"}, "alpaca": {"instruction", "output"}, "prompt_completion": {"prompt", "completion"},
            "messages": {"messages"}, "sharegpt": {"conversations"}}[fmt]
    return need <= set(columns)


def _convert(row: dict[str, Any], fmt: str) -> dict[str, Any] | None:
    """One raw row -> {'text'} | {'prompt','completion'} | {'messages'}; None when unusable."""
    if fmt == "text":
        text = row.get("text")
        return {"text": text} if isinstance(text, str) and text.strip() else None
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
            messages = _clean_messages(prompt + completion)
            return {"messages": messages} if messages else None
        if isinstance(prompt, str) and isinstance(completion, str) and completion.strip():
            return {"prompt": prompt, "completion": completion}
        return None
    if fmt == "alpaca":
        instruction, extra, output = row.get("instruction"), row.get("input"), row.get("output")
        if not (isinstance(instruction, str) and instruction.strip() and isinstance(output, str) and output.strip()):
            return None
        user = instruction if not (isinstance(extra, str) and extra.strip()) else f"{instruction}\n\n{extra}"
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}
    if fmt == "sharegpt":
        turns = row.get("conversations") or []
        messages = _clean_messages([{"role": _SHAREGPT_ROLES.get(str(t.get("from")), ""), "content": t.get("value")}
                                    for t in turns if isinstance(t, dict)])
        return {"messages": messages} if messages else None
    messages = _clean_messages(row.get("messages"))
    return {"messages": messages} if messages else None


def _clean_messages(messages: Any) -> list[dict[str, str]] | None:
    if not isinstance(messages, list) or not messages:
        return None
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            return None
        if not isinstance(m.get("content"), str):
            return None
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        return None
    return out


def _to_trl(rows: list[dict[str, Any]], fmt: str, chat_template: str | None, warnings: list[str],
            tokenizer: Any, param: str) -> PreparedDataset:
    import datasets

    if "messages" not in rows[0]:
        return PreparedDataset(datasets.Dataset.from_list(rows), fmt, warnings=warnings)
    if has_generation_marks(chat_template):
        return PreparedDataset(datasets.Dataset.from_list(rows), fmt, assistant_only_loss=True, warnings=warnings)
    if tokenizer is not None:
        return _tokenized(rows, fmt, tokenizer, warnings, param)
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


def _tokenized(rows: list[dict[str, Any]], fmt: str, tokenizer: Any, warnings: list[str],
               param: str) -> PreparedDataset:
    """Chat rows rendered with the model's template and tokenized; labels are the assistant turns' tokens, -100
    elsewhere: a labels column is taken as is by TRL 1.16 and by the TRL 1.15 Unsloth patches (both checked)."""
    import datasets

    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    empty = []
    for i, row in enumerate(rows):
        try:
            encoded = tokenize_chat(tokenizer, row["messages"])
        except Exception as exc:  # the template refuses the conversation (e.g. roles that do not alternate)
            raise DatasetError(f"{param}: row {i} cannot be rendered with the model's chat template "
                               f"({type(exc).__name__}: {str(exc)[:300]}); fix the row or load with another "
                               f"chat_template.") from None
        if not any(encoded["assistant_masks"]):
            empty.append(i)
            continue
        columns["input_ids"].append(encoded["input_ids"])
        columns["labels"].append([t if m else -100 for t, m in zip(encoded["input_ids"], encoded["assistant_masks"])])
    if not columns["input_ids"]:
        raise DatasetError(f"{param}: the model's chat template leaves no assistant tokens to train on in any row "
                           f"(it does not write the assistant turns).")
    if empty:
        warnings.append(f"{param}: skipped {len(empty)} rows whose assistant turns the chat template does not "
                        f"write (first row indexes: {empty[:10]}).")
    return PreparedDataset(datasets.Dataset.from_dict(columns), fmt, tokenized=True, warnings=warnings)
