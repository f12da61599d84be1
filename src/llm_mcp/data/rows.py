"""One raw row -> TRL's columns ({'text'} | {'prompt','completion'} | {'messages'}; for the preference methods
{'prompt','chosen','rejected'} | {'prompt','completion','label'}; for grpo {'prompt','answer'}), or why it cannot be.

Two kinds of unusable row: empty fields (None, blank strings, empty lists), which training skips and counts as it
always has; and invalid rows (wrong types, unknown roles, chat turns out of order, no assistant turn, a row of
another shape than the first: shape_problem), which training refuses, naming the row, unless skip_invalid_rows.
No torch, no `datasets`: the server checks rows too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FORMATS_HELP = (
    "rows with 'text'; or 'instruction' + 'output' (+ optional 'input', Alpaca); or 'prompt' + 'completion'; "
    "or 'messages' (a list of {role, content}); or ShareGPT 'conversations' (a list of {from, value}); or "
    "preference pairs 'prompt' + 'chosen' + 'rejected' (method='dpo' or 'orpo'); or unpaired 'prompt' + "
    "'completion' + a boolean 'label' (method='kto'); or 'prompt' (or 'messages') + a reference 'answer' "
    "(method='grpo')"
)
PREFERENCE = "preference"  # {prompt, chosen, rejected}: what dpo and orpo train on
UNPAIRED = "unpaired"  # {prompt, completion, label}: kto's good (true) and bad (false) answers
PROMPT_ANSWER = "prompt_answer"  # {prompt or messages, answer}: grpo's prompts, the answer its rewards compare with
ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system turn
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant", "tool": "tool"}
_NEEDED = {"text": {"text"}, "alpaca": {"instruction", "output"}, "prompt_completion": {"prompt", "completion"},
           "messages": {"messages"}, "sharegpt": {"conversations"}, PREFERENCE: {"prompt", "chosen", "rejected"},
           UNPAIRED: {"prompt", "completion", "label"}, PROMPT_ANSWER: {"answer"}}


@dataclass(frozen=True)
class Converted:
    """A row in TRL's columns, or None with the reason it is invalid (no reason: its fields are empty)."""

    row: dict[str, Any] | None
    problem: str | None = None


EMPTY = Converted(None)


def detect_format(columns: list[str]) -> str | None:
    cols = set(columns)
    if {"prompt", "chosen", "rejected"} <= cols:
        return PREFERENCE
    if {"prompt", "completion", "label"} <= cols:
        return UNPAIRED
    if "answer" in cols and ("prompt" in cols or "messages" in cols) and "completion" not in cols:
        return PROMPT_ANSWER
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


def loss_on(fmt: str) -> str:
    """What a run learns from rows of this format (inspect_dataset and the train answer say it)."""
    return {PREFERENCE: "preference pairs (chosen over rejected; method='dpo' or 'orpo')",
            UNPAIRED: "unpaired completions (label true toward, false away from; method='kto')",
            PROMPT_ANSWER: "the model's own completions, scored by the declared rewards (method='grpo')",
            "text": "all tokens"}.get(fmt, "answers only")


def has_columns(columns: list[str], fmt: str) -> bool:
    cols = set(columns)
    if fmt == PROMPT_ANSWER:
        return "answer" in cols and ("prompt" in cols or "messages" in cols)
    return _NEEDED[fmt] <= cols


def row_format(row: dict[str, Any]) -> str | None:
    """The format a single row's non-empty fields fit (rows of inline lists share the union of all columns)."""
    return detect_format([k for k, v in row.items() if not _blank(v)])


def convert_row(row: dict[str, Any], fmt: str) -> Converted:
    """One raw row (a dict) in the given format -> TRL's columns, or why not."""
    if fmt == "text":
        return _text(row)
    if fmt == "prompt_completion":
        return _prompt_completion(row)
    if fmt == "alpaca":
        return _alpaca(row)
    if fmt == "sharegpt":
        return _sharegpt(row)
    if fmt == PREFERENCE:
        return _preference(row)
    if fmt == UNPAIRED:
        return _unpaired(row)
    if fmt == PROMPT_ANSWER:
        return _prompt_answer(row)
    return _chat(row.get("messages"), "messages")


def _blank(value: Any) -> bool:
    return value is None or value == [] or (isinstance(value, str) and not value.strip())


def _json_type(value: Any) -> str:
    names = {str: "string", bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _wrong_type(field: str, value: Any, allowed: str) -> Converted:
    return Converted(None, f"{field} is a {_json_type(value)}; {allowed} is allowed")


def _text(row: dict[str, Any]) -> Converted:
    text = row.get("text")
    if _blank(text):
        return EMPTY
    return Converted({"text": text}) if isinstance(text, str) else _wrong_type("text", text, "a string")


def _prompt_completion(row: dict[str, Any]) -> Converted:
    prompt, completion = row.get("prompt"), row.get("completion")
    if _blank(completion) or prompt is None:
        return EMPTY
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
        labels = [f"prompt[{i}]" for i in range(len(prompt))] + [f"completion[{i}]" for i in range(len(completion))]
        return _chat(prompt + completion, "prompt + completion", labels)
    if isinstance(prompt, str) and isinstance(completion, str):
        return Converted({"prompt": prompt, "completion": completion})
    return Converted(None, f"prompt is a {_json_type(prompt)} and completion a {_json_type(completion)}; both "
                           f"strings, or both lists of messages, are allowed")


def _preference(row: dict[str, Any]) -> Converted:
    """A preference pair: the prompt, and the answer preferred (chosen) over the other (rejected); all strings,
    or all lists of messages (chosen and rejected the assistant turns)."""
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if _blank(prompt) or _blank(chosen) or _blank(rejected):
        return EMPTY
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        if chosen.strip() == rejected.strip():
            return Converted(None, "chosen and rejected are the same answer; a pair must prefer one over another")
        return Converted({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        for name, turns in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            for i, m in enumerate(turns):
                if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                        not isinstance(m.get("role"), str) or ROLE_ALIASES.get(m["role"], m["role"]) not in ROLES:
                    return _wrong_type(f"{name}[{i}]", m, "an object with a known 'role' and string 'content'")
        if chosen == rejected:
            return Converted(None, "chosen and rejected are the same answer; a pair must prefer one over another")
        return Converted({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return Converted(None, f"prompt, chosen and rejected are a {_json_type(prompt)}, a {_json_type(chosen)} and a "
                           f"{_json_type(rejected)}; all strings, or all lists of messages, are allowed")


def _unpaired(row: dict[str, Any]) -> Converted:
    """An unpaired example: a prompt, an answer, and whether that answer is desirable (label true) or not."""
    label = row.get("label")
    converted = _prompt_completion(row)
    if converted.row is None:
        return converted
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # a CSV file's booleans
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        return _wrong_type("label", label, "true (a desirable completion) or false (an undesirable one)")
    if "messages" in converted.row:  # conversational: back to prompt turns and the completion turn(s)
        turns, cut = converted.row["messages"], len(row["prompt"])
        return Converted({"prompt": turns[:cut], "completion": turns[cut:], "label": label})
    return Converted({**converted.row, "label": label})


def _prompt_answer(row: dict[str, Any]) -> Converted:
    """A prompt to generate from (a string, or chat turns up to the last user turn) and the reference answer the
    rewards compare completions with (any JSON scalar, kept as text)."""
    answer = row.get("answer")
    if _blank(answer):
        return EMPTY
    if isinstance(answer, (dict, list)):
        return _wrong_type("answer", answer, "a string or a number")
    answer = answer if isinstance(answer, str) else json_scalar(answer)
    prompt = row.get("prompt") if row.get("prompt") is not None else row.get("messages")
    field = "prompt" if row.get("prompt") is not None else "messages"
    if _blank(prompt):
        return EMPTY
    if isinstance(prompt, str):
        return Converted({"prompt": prompt, "answer": answer})
    if not isinstance(prompt, list):
        return _wrong_type(field, prompt, "a string or a list of {role, content}")
    turns = list(prompt)
    while turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
        turns.pop()  # an answer turn already written: grpo generates its own
    checked = _chat(turns + [{"role": "assistant", "content": "."}], field)
    if checked.row is None:
        return checked
    return Converted({"prompt": checked.row["messages"][:-1], "answer": answer})


def json_scalar(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _alpaca(row: dict[str, Any]) -> Converted:
    instruction, extra, output = row.get("instruction"), row.get("input"), row.get("output")
    if _blank(instruction) or _blank(output):
        return EMPTY
    for name, value in (("instruction", instruction), ("output", output)):
        if not isinstance(value, str):
            return _wrong_type(name, value, "a string")
    if extra is not None and not isinstance(extra, str):
        return _wrong_type("input", extra, "a string")
    user = instruction if _blank(extra) else f"{instruction}\n\n{extra}"
    return Converted({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]})


def _sharegpt(row: dict[str, Any]) -> Converted:
    turns = row.get("conversations")
    if _blank(turns):
        return EMPTY
    if not isinstance(turns, list):
        return _wrong_type("conversations", turns, "a list of {from, value}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return _wrong_type(f"conversations[{i}]", turn, "an object with 'from' and 'value'")
        source = turn.get("from")
        role = SHAREGPT_ROLES.get(source) if isinstance(source, str) else None
        if role is None:
            return Converted(None, f"conversations[{i}] has from={source!r}; allowed: "
                                   f"{', '.join(repr(r) for r in SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn.get("value")})
    return _chat(messages, "conversations", content_name="value")  # ShareGPT's name for the content


def _chat(messages: Any, field: str, labels: list[str] | None = None, content_name: str = "content") -> Converted:
    """A conversation checked turn by turn: object, known role, string content, order, an answer to train on."""
    if _blank(messages):
        return EMPTY
    if not isinstance(messages, list):
        return _wrong_type(field, messages, "a list of {role, content}")
    labels = labels or [f"{field}[{i}]" for i in range(len(messages))]
    out = []
    for label, m in zip(labels, messages):
        if not isinstance(m, dict):
            return _wrong_type(label, m, "an object with 'role' and 'content'")
        role = m.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            return Converted(None, f"{label} has role={m.get('role')!r}; allowed: "
                                   f"{', '.join(repr(r) for r in ROLES)} (and {_aliases()})")
        if not isinstance(m.get("content"), str):
            return _wrong_type(f"{label}.{content_name}", m.get("content"), "a string")
        out.append({"role": role, "content": m["content"]})
    problem = order_problem([m["role"] for m in out], labels)
    if problem:
        return Converted(None, problem)
    if "assistant" not in (m["role"] for m in out):
        return Converted(None, "has no assistant turn to train on; a conversation needs at least one")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        return EMPTY
    return Converted({"messages": out})


def _aliases() -> str:
    return ", ".join(f"{alias!r} for {role!r}" for alias, role in ROLE_ALIASES.items())


def shape_problem(converted: dict[str, Any], first: dict[str, Any], first_where: str) -> str | None:
    """Why a usable row cannot go to TRL with the first usable row (at first_where), or None: TRL takes one shape
    of row per dataset, and prompt/completion rows come as strings or as lists of messages (-> 'messages')."""
    if set(converted) == set(first):
        if "prompt" in first and isinstance(converted["prompt"], list) != isinstance(first["prompt"], list):
            return (f"has a {'conversational' if isinstance(converted['prompt'], list) else 'plain-text'} prompt "
                    f"where the first usable row ({first_where}) has a "
                    f"{'conversational' if isinstance(first['prompt'], list) else 'plain-text'} one; use one shape")
        return None
    if "messages" in converted and "prompt" in first:
        return (f"is a conversational prompt/completion row among plain-text ones; use one shape (the first usable "
                f"row, {first_where}, has strings; this one lists of messages)")
    if "prompt" in converted and "messages" in first:
        return (f"is a plain-text prompt/completion row among conversational ones; use one shape (the first usable "
                f"row, {first_where}, has lists of messages; this one strings)")
    return (f"has the columns {sorted(converted)} where the first usable row ({first_where}) has {sorted(first)}; "
            f"use one shape")


def order_problem(roles: list[str], labels: list[str]) -> str | None:
    """Why a conversation's roles are out of order, or None. Tool turns (after an assistant's call) are free."""
    seen_user, previous = False, None
    for i, role in enumerate(roles):
        if role == "system" and i > 0:
            return f"{labels[i]} is a system turn after the first turn; a system turn may only open a conversation"
        if role == "assistant" and not seen_user:
            return f"{labels[i]} is an assistant turn before any user turn; a conversation starts with a user turn"
        if role == previous and role in ("user", "assistant"):
            return (f"{labels[i - 1]} and {labels[i]} are two {role} turns in a row; user and assistant turns "
                    f"alternate")
        seen_user = seen_user or role == "user"
        previous = role
    return None
