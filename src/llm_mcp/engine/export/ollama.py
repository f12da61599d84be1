"""Ollama Modelfile for a GGUF: FROM the file, the chat template as an Ollama (Go) TEMPLATE, stop tokens.

The TEMPLATE is derived from the tokenizer's Hugging Face chat template by rendering it with sentinel contents and
replacing them with {{ .System }}, {{ .Prompt }} and {{ .Response }}. Pure text work on a loaded tokenizer.
"""

from __future__ import annotations

from typing import Any


def ollama_modelfile(gguf_filename: str, tokenizer: Any) -> str:
    """Text of an Ollama Modelfile for ``gguf_filename`` (a file next to the Modelfile).

    The TEMPLATE is derived from the tokenizer's HF chat template by rendering it with sentinel contents and
    replacing them with {{ .System }}, {{ .Prompt }} and {{ .Response }}; stop parameters are the EOS token and
    any special token that closes the assistant turn. If the template cannot be rendered, TEMPLATE is omitted
    and a comment says so (Ollama then uses its default).
    """
    lines = [f"FROM ./{gguf_filename}", ""]
    stops: list[str] = []
    try:
        template, end_of_turn = _ollama_template(tokenizer)
    except Exception as exc:  # noqa: BLE001 - a template that cannot render must not block the export
        lines.append(f"# TEMPLATE omitted: the chat template could not be rendered ({type(exc).__name__}: {exc}).")
        template, end_of_turn = None, None
    if template is not None:
        if '"""' in template:
            lines.append('# TEMPLATE omitted: the rendered chat template contains """, which a Modelfile cannot quote.')
        else:
            lines.append(f'TEMPLATE """{template}"""')
    eos = getattr(tokenizer, "eos_token", None)
    for tok in (eos, end_of_turn):
        if tok and tok not in stops:
            stops.append(tok)
    if stops:
        lines.append("")
    for tok in stops:
        escaped = tok.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'PARAMETER stop "{escaped}"')
    return "\n".join(lines) + "\n"


_SYS, _USER, _ASSISTANT = "SYSTEMSENTINELXQ7", "USERSENTINELXQ7", "ASSISTANTSENTINELXQ7"


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, not text")
    return text


def _go_literal(text: str) -> str:
    # "{{" would start a Go template action; emit it as a string action instead
    return text.replace("{{", '{{ "{{" }}')


def _ollama_template(tokenizer: Any) -> tuple[str, str | None]:
    """(Go template, end-of-turn special token after the assistant content or None)."""
    turn = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}]
    plain = _render(tokenizer, turn)
    for sentinel in (_USER, _ASSISTANT):
        if plain.count(sentinel) != 1:
            raise ValueError(f"the template does not render each message once ({sentinel} x{plain.count(sentinel)})")
    try:
        with_sys = _render(tokenizer, [{"role": "system", "content": _SYS}, *turn])
        if with_sys.count(_SYS) != 1:
            with_sys = None
    except Exception:  # noqa: BLE001 - templates such as Gemma's reject a system role
        with_sys = None

    if with_sys is None:
        head, body = "", plain
    else:
        # with_sys = prefix + sys_block + rest, plain = prefix + plain_mid + rest
        p = 0
        while p < min(len(with_sys), len(plain)) and with_sys[p] == plain[p] and with_sys[p:p + len(_SYS)] != _SYS:
            p += 1
        s = 0
        while (s < min(len(with_sys), len(plain)) - p and with_sys[-1 - s] == plain[-1 - s]
               and len(with_sys) - 1 - s >= with_sys.index(_SYS) + len(_SYS)):
            s += 1
        prefix, rest = with_sys[:p], with_sys[len(with_sys) - s:]
        sys_block, plain_mid = with_sys[p:len(with_sys) - s], plain[p:len(plain) - s]
        if not plain_mid:
            # Slide the split left while it stays valid, so the block starts at the turn marker ("<|im_start|>system")
            while prefix and prefix[-1] == sys_block[-1] and _SYS in prefix[-1] + sys_block[:-1]:
                sys_block, rest, prefix = prefix[-1] + sys_block[:-1], sys_block[-1] + rest, prefix[:-1]
        sys_part = _go_literal(sys_block).replace(_SYS, "{{ .System }}")
        alt = f"{{{{ else }}}}{_go_literal(plain_mid)}" if plain_mid else ""
        head = f"{_go_literal(prefix)}{{{{ if .System }}}}{sys_part}{alt}{{{{ end }}}}"
        body = rest

    # llama.cpp/Ollama add BOS themselves when the tokenizer does; a template-rendered BOS would double it
    bos = getattr(tokenizer, "bos_token", None)
    adds_bos = bool(bos) and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    if adds_bos and head.startswith(bos):
        head = head[len(bos):]
    elif adds_bos and not head and body.startswith(bos):
        body = body[len(bos):]

    after = plain[plain.index(_ASSISTANT) + len(_ASSISTANT):]
    specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len, reverse=True)
    end_of_turn = next((t for t in specials if after.startswith(t)), None)
    # replaced in head too: a template may render the system block after the user's text
    template = head + _go_literal(body)
    return template.replace(_USER, "{{ .Prompt }}").replace(_ASSISTANT, "{{ .Response }}"), end_of_turn
