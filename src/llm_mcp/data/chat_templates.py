"""Chat templates: which one a loaded model uses (its tokenizer's own, a named one, a Jinja string, or the ChatML
fallback), and the assistant mask of a conversation rendered with it, computed by rendering (most real templates
have no `{% generation %}` markers, so TRL cannot find the assistant tokens itself).

Works on a tokenizer object and never imports torch. A Jinja template is data: transformers renders it in its
sandboxed Jinja environment.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Any

from llm_mcp.config import CHAT_TEMPLATE_NAMES
from llm_mcp.errors import InvalidArgument

FALLBACK = "chatml"
_EOT = "__EOT__"  # replaced by the template's end-of-turn token, or by eos_token where the tokenizer lacks it
_BOS = "{%- if bos_token %}{{ bos_token }}{% endif -%}"
_GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SENTINEL = "Zq7Sentinel4Xv"  # an assistant content no template alters (no spaces, no markup)
_PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
          {"role": "assistant", "content": _SENTINEL}, {"role": "user", "content": "V"}]


@dataclass(frozen=True)
class Named:
    """A named template: its Jinja source, the tokens that open turns, and the token that ends one."""

    source: str
    markers: tuple[str, ...]
    end_of_turn: str | None  # None: the template ends assistant turns with eos_token itself


NAMED: dict[str, Named] = {
    "chatml": Named(
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + __EOT__ + '\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}",
        ("<|im_start|>",), "<|im_end|>"),
    "qwen2.5": Named(
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.' + __EOT__"
        " + '\\n' }}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + __EOT__ + '\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}",
        ("<|im_start|>",), "<|im_end|>"),
    "llama3": Named(
        _BOS + "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + __EOT__ }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}",
        ("<|start_header_id|>", "<|end_header_id|>"), "<|eot_id|>"),
    "gemma": Named(
        _BOS + "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
        "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '')"
        " + message['content'] | trim + __EOT__ + '\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}",
        ("<start_of_turn>",), "<end_of_turn>"),
    "mistral": Named(  # Mistral-7B-Instruct v0.1/v0.2: [INST] markers are text, an answer ends with EOS
        _BOS + "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set system_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'assistant' -%}{{ message['content'] | trim + eos_token }}"
        "{%- else -%}{{ '[INST] ' + (system_prefix if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{%- endif -%}"
        "{%- endfor -%}",
        (), None),
    "phi3": Named(
        "{%- for message in messages -%}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + __EOT__ + '\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}",
        ("<|system|>", "<|user|>", "<|assistant|>"), "<|end|>"),
}
assert set(NAMED) == set(CHAT_TEMPLATE_NAMES), "config.CHAT_TEMPLATE_NAMES must list the named templates"


@dataclass(frozen=True)
class TemplateChoice:
    """The chat template a model uses, where it came from, and what the agent should be told about it."""

    template: Any  # str (or transformers' dict of named variants, for a tokenizer's own)
    source: str  # "tokenizer" | "named" | "jinja" | "fallback"
    name: str | None = None  # the named template, for "named" and "fallback"
    end_of_turn: str | None = None  # the token that closes an assistant turn (None: none found)
    warnings: list[str] = field(default_factory=list)


_CHOICES: "weakref.WeakKeyDictionary[Any, TemplateChoice]" = weakref.WeakKeyDictionary()


def choice_of(tokenizer: Any) -> TemplateChoice | None:
    """The choice `use_chat_template` made for this tokenizer (None: not loaded through it)."""
    return _CHOICES.get(tokenizer)


def summary(tokenizer: Any) -> dict[str, Any] | None:
    """The load answer's `chat_template`: where the template came from, its name, and its end-of-turn token."""
    choice = choice_of(tokenizer)
    if choice is None:
        return None
    return {"source": choice.source, "name": choice.name, "end_of_turn": choice.end_of_turn,
            "generation_markers": has_generation_marks(choice.template)}


def use_chat_template(tokenizer: Any, requested: str | None) -> TemplateChoice:
    """Install the chat template asked for (None: the tokenizer's own, else the ChatML fallback) on the tokenizer;
    refuse one that does not render a conversation. The choice is remembered for inspect_dataset."""
    own = getattr(tokenizer, "chat_template", None)
    if requested is None and own:
        choice = TemplateChoice(own, "tokenizer", warnings=[])
    elif requested is None:
        template, notes = build_named(FALLBACK, tokenizer)
        suits = [n for n in CHAT_TEMPLATE_NAMES if n != FALLBACK and NAMED[n].markers
                 and all(_is_token(tokenizer, t) for t in NAMED[n].markers + (NAMED[n].end_of_turn or "",) if t)]
        hint = f"; this tokenizer's tokens suit {' or '.join(repr(n) for n in suits)}" if suits else ""
        notes.insert(0, f"the tokenizer has no chat template: chat rows and messages use the server's fallback "
                        f"ChatML (chat_template='chatml'), which a base model follows only after training on it. "
                        f"Pass chat_template at load to choose another: one of {list(CHAT_TEMPLATE_NAMES)} or a "
                        f"Jinja string{hint}.")
        choice = TemplateChoice(template, "fallback", FALLBACK, warnings=notes)
    elif is_jinja(requested):
        choice = TemplateChoice(requested, "jinja", warnings=[])
    else:
        name = check_name(requested)
        template, notes = build_named(name, tokenizer)
        if own:
            notes.insert(0, f"chat_template={name!r} replaces the tokenizer's own chat template for training, "
                            f"generation and export.")
        choice = TemplateChoice(template, "named", name, warnings=notes)
    if requested is not None:
        _check_renders(tokenizer, choice.template, requested)
    tokenizer.chat_template = choice.template
    choice = TemplateChoice(choice.template, choice.source, choice.name, end_of_turn_token(tokenizer),
                            choice.warnings)
    if choice.end_of_turn is None and choice.source != "tokenizer":
        choice.warnings.append("the chat template ends an assistant turn with no special token, so the model may "
                               "not learn to stop; end assistant turns with eos_token or an end-of-turn token.")
    _CHOICES[tokenizer] = choice
    return choice


def is_jinja(value: str) -> bool:
    return "{{" in value or "{%" in value


def check_name(value: str) -> str:
    """A named template's canonical name; the error lists the names known."""
    name = value.strip().lower()
    if name not in NAMED:
        raise InvalidArgument("chat_template", value, f"one of {list(CHAT_TEMPLATE_NAMES)} or a Jinja template "
                                                      "string (containing '{{' or '{%')")
    return name


def build_named(name: str, tokenizer: Any) -> tuple[str, list[str]]:
    """A named template for this tokenizer. Its turn markers are written as the tokenizer's tokens where it has
    them, as plain text (several tokens each) where it lacks them; a missing end-of-turn token is replaced by
    EOS. No token is added: a new token's embedding row would stay untrained under LoRA, so the model could
    never emit it, and generation would never stop."""
    named = NAMED[name]
    missing = [t for t in named.markers if not _is_token(tokenizer, t)]
    eot = named.end_of_turn
    eot_missing = eot is not None and not _is_token(tokenizer, eot)
    source = named.source.replace(_EOT, "eos_token" if eot is None or eot_missing else repr(eot))
    notes = []
    if missing or eot_missing:
        lacking = missing + ([eot] if eot_missing else [])
        notes.append(f"chat_template={name!r}: the tokenizer has no {', '.join(repr(t) for t in lacking)} token"
                     f"{'s' if len(lacking) > 1 else ''}; "
                     + (f"{', '.join(repr(t) for t in missing)} {'are' if len(missing) > 1 else 'is'} written as "
                        "plain text, as several ordinary tokens; " if missing else "")
                     + (f"turns end with the EOS token {tokenizer.eos_token!r} instead of {eot!r}, so generation "
                        "stops there; " if eot_missing else "")
                     + "no tokens are added (LoRA would leave new token embeddings untrained).")
    return source, notes


def has_generation_marks(template: Any) -> bool:
    if isinstance(template, dict):
        template = template.get("default", "")
    return isinstance(template, str) and _GENERATION_MARK.search(template) is not None


def end_of_turn_token(tokenizer: Any, template: Any = None) -> str | None:
    """The token that closes an assistant turn in the chat template: the special token right after the
    assistant's content in a rendered conversation (e.g. <|im_end|>, <|eot_id|>, <end_of_turn>, </s>)."""
    try:
        text = render(tokenizer, _PROBE[1:], template=template)
    except Exception:
        return None
    at = text.find(_SENTINEL)
    return None if at < 0 else _leading_special(tokenizer, text[at + len(_SENTINEL):])


def render(tokenizer: Any, messages: list[dict[str, str]], *, template: Any = None,
           add_generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **({"chat_template": template} if template is not None else {}))
    assert isinstance(text, str), f"apply_chat_template returned {type(text).__name__}, not text"
    return text


# -- the assistant mask -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RenderedChat:
    """A conversation as the template renders it, and the character spans of what training learns: each
    assistant turn as the template writes it after the generation prompt, up to and including its end-of-turn
    token."""

    text: str
    spans: list[tuple[int, int]]


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> RenderedChat:
    """Find each assistant turn in the rendered conversation without generation markers. Per assistant turn:
    it starts where the prompt up to it, rendered with the generation prompt, ends (when that is a prefix of the
    whole), else where the text before the turn's content agrees with a rendering whose content is a sentinel
    (templates that move the system prompt or drop earlier reasoning); it ends after the content with the
    special token that closes the turn."""
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        span = _turn_span(tokenizer, messages, i, text)
        if span is not None:
            spans.append(span)
    return RenderedChat(text, spans)


def _turn_span(tokenizer: Any, messages: list[dict[str, str]], i: int, text: str) -> tuple[int, int] | None:
    probe = [*messages[:i], {**messages[i], "content": _SENTINEL}, *messages[i + 1:]]
    try:
        with_sentinel = render(tokenizer, probe)
    except Exception:
        return None
    at = with_sentinel.find(_SENTINEL)
    if at < 0:  # the template does not render this turn's content (it drops it)
        return None
    before, after = with_sentinel[:at], with_sentinel[at + len(_SENTINEL):]
    content_start = _common_prefix(before, text)
    content_end = len(text) - _common_suffix(after, text)
    start = content_start
    try:
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True) if i else None
    except Exception:
        prompt = None
    if prompt and text.startswith(prompt) and len(prompt) <= content_start:
        start = len(prompt)  # what the model writes after the generation prompt (e.g. Qwen3's think block)
    if content_end < start:
        return None
    end_of_turn = _leading_special(tokenizer, text[content_end:])
    end = content_end + len(end_of_turn) if end_of_turn and text.startswith(end_of_turn, content_end) \
        else content_end
    return (start, end) if end > start else None


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]]) -> dict[str, list[int]]:
    """input_ids of the rendered conversation (as apply_chat_template tokenizes it: the template writes any
    BOS) and assistant_masks: 1 on the tokens of each assistant turn and its end-of-turn token."""
    chat = assistant_spans(tokenizer, messages)
    try:
        enc = tokenizer(chat.text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # a slow tokenizer: tokenize piece by piece
        return _tokenize_pieces(tokenizer, chat)
    ids = list(enc["input_ids"])
    mask = [int(_in_spans(s, e, chat.spans)) for s, e in offsets]
    return {"input_ids": ids, "assistant_masks": mask}


def _in_spans(s: int, e: int, spans: list[tuple[int, int]]) -> bool:
    """A token is trained where it overlaps a span, as transformers' own assistant mask marks it."""
    if e == s:  # a zero-width token (some special tokens): where it stands
        return any(start <= s < end for start, end in spans)
    return any(s < end and e > start for start, end in spans)


def _tokenize_pieces(tokenizer: Any, chat: RenderedChat) -> dict[str, list[int]]:
    ids: list[int] = []
    mask: list[int] = []
    at = 0
    for start, end in [*chat.spans, (len(chat.text), len(chat.text))]:
        for piece, trained in ((chat.text[at:start], 0), (chat.text[start:end], 1)):
            if piece:
                part = tokenizer(piece, add_special_tokens=False).input_ids
                ids += part
                mask += [trained] * len(part)
        at = end
    return {"input_ids": ids, "assistant_masks": mask}


def trained_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The runs of consecutive trained token ids (one per assistant turn)."""
    runs: list[list[int]] = []
    previous = 0
    for token, bit in zip(ids, mask):
        if bit and not previous:
            runs.append([])
        if bit:
            runs[-1].append(token)
        previous = bit
    return runs


def _leading_special(tokenizer: Any, text: str) -> str | None:
    """The special (or added) token text starts with, if it starts with one."""
    found = _special_tokens(tokenizer)[1].match(text)
    return found.group(0) if found else None


_SPECIAL: "weakref.WeakKeyDictionary[Any, tuple[frozenset[int], re.Pattern[str]]]" = weakref.WeakKeyDictionary()


def _special_tokens(tokenizer: Any) -> tuple[frozenset[int], re.Pattern[str]]:
    """The ids of the tokenizer's special and added tokens, and a pattern matching their text (longest first);
    built once per tokenizer, since Gemma's has thousands."""
    cached = _SPECIAL.get(tokenizer)
    if cached is None:
        added = {i: getattr(t, "content", str(t)) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        ids = frozenset(tokenizer.all_special_ids) | frozenset(added)
        texts = set(added.values()) | set(tokenizer.all_special_tokens)
        pattern = re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True) if t) or "(?!)")
        cached = _SPECIAL[tokenizer] = (ids, pattern)
    return cached


def _is_special_id(tokenizer: Any, token_id: int) -> bool:
    return token_id in _special_tokens(tokenizer)[0]


def _is_token(tokenizer: Any, text: str) -> bool:
    """Whether text is one token of this tokenizer (an added or special token)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return len(ids) == 1 and _is_special_id(tokenizer, ids[0])


def _check_renders(tokenizer: Any, template: str, requested: str) -> None:
    """A chosen template must render a conversation and write the messages' content."""
    shown = requested if len(requested) <= 60 else requested[:57] + "..."
    try:
        try:
            text = render(tokenizer, _PROBE, template=template)
        except Exception:  # some templates refuse a system message (Gemma 2's)
            text = render(tokenizer, _PROBE[1:], template=template)
    except Exception as exc:
        raise InvalidArgument("chat_template", shown, f"a Jinja chat template that renders a user/assistant "
                                                      f"conversation (rendering failed: {type(exc).__name__}: "
                                                      f"{str(exc)[:300]})") from None
    if _SENTINEL not in text:
        raise InvalidArgument("chat_template", shown, "a chat template that writes each message's content "
                                                      "(message['content'])")


def _common_prefix(a: str, b: str) -> int:
    if b.startswith(a):  # the usual case, in C
        return len(a)
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix(a: str, b: str) -> int:
    if b.endswith(a):
        return len(a)
    n = min(len(a), len(b))
    i = 0
    while i < n and a[-1 - i] == b[-1 - i]:
        i += 1
    return i
