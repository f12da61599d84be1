"""Issue 8: bad input through the MCP client, against the real server.

Every tool gets wrong types, missing required fields, out-of-range numbers, unknown enum values, unknown extra
arguments, huge strings and too many inline rows (cases generated from the tools' own JSON input schemas); every
path-carrying parameter gets path traversal, absolute paths, a symbolic link out of the workspace, `~` and the
workspace's own state folder; then a hypothesis fuzz over every tool's arguments. Each case must end in a clear
tool error that names the parameter, while the server stays up, the model loaded before stays loaded and the
files written before keep their bytes. The last test prints `BAD-INPUT CASES: N` (run pytest with -s to see it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import FAST_LOAD, FAST_TRAIN, McpSession, server_config, text_of
from llm_mcp.config import ServerConfig
from llm_mcp.server.app import create_server
from llm_mcp.server.sandbox import MAX_INLINE_BYTES, MAX_INLINE_ROWS, MAX_PATH_CHARS

TOKEN = "hf_SECRET_abc123"
CALL_TIMEOUT = 60  # seconds; a call that takes longer counts as a hang
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
MAX_ERROR_CHARS = 20_000  # an error that echoes a huge input back is not a clear error
HUGE_PATH = 5 * 1024 * 1024  # 5 MB strings for path-like parameters
HUGE_TEXT = 300_000  # past every text limit (prompts: 200k, probe prompts: 10k) for the other strings
KEEPER, UKEEPER = "keeper", "ukeeper"
COUNTS = {"table": 0, "path": 0, "fuzz": 0}


def _schemas() -> dict[str, dict[str, Any]]:
    """The tools' input schemas, read from a server that is never started (no lifespan, nothing written)."""
    with tempfile.TemporaryDirectory() as tmp:
        tools = asyncio.run(create_server(ServerConfig(workspace=tmp)).list_tools())
    return {t.name: t.input_schema for t in tools}


SCHEMAS = _schemas()
PATH_PARAMS = {"model_name", "train_dataset", "eval_dataset", "dataset", "output_dir", "resume_from_checkpoint"}


# -- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def offline():
    """No network here: make in-server hub look-ups (estimate_memory, inspect_dataset) fail at once, not after
    timeouts; the workers get the same through worker_env."""
    import datasets.config
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def mcp(workspace, tiny_model, offline):
    """This module's own server (same as conftest's, with offline workers)."""
    with McpSession(create_server(server_config(workspace, tiny_model, worker_env=OFFLINE))) as session:
        yield session


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder outside the workspace holding a secret, a dataset and a model config an attacker would want."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "secret.txt").write_text("top secret\n")
    (folder / "data.jsonl").write_text(json.dumps({"text": "a row from outside the workspace"}) + "\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                                    "num_hidden_layers": 2, "intermediate_size": 128,
                                                    "vocab_size": 100, "num_key_value_heads": 4}))
    return folder


@pytest.fixture(scope="module")
def state(mcp, tiny_model, workspace, outside, demo_rows) -> dict[str, Any]:
    """Load 'keeper', train it 2 steps into kept-run, load 'ukeeper' (unsloth family, unprepared), link
    workspace/escape -> the outside folder, and record what must not change."""
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": KEEPER, **FAST_LOAD})
    mcp.ok("qloraevolved_prepare_for_training", {"model_id": KEEPER, **FAST_TRAIN, "output_dir": "kept-run",
                                                 "max_steps": 2, "report_to": "none"})
    trained = mcp.ok("qloraevolved_train", {"model_id": KEEPER, "train_dataset": demo_rows, "wait_seconds": -1})
    assert trained["status"] == "success" and trained["output_dir"] == "kept-run/final"
    assert (workspace / "kept-run/final/adapter_model.safetensors").is_file()
    mcp.ok("unsloth_load_model", {"model_name": str(tiny_model), "model_id": UKEEPER, "max_seq_length": 128})
    (workspace / "escape").symlink_to(outside, target_is_directory=True)
    (workspace / "statelink").symlink_to(workspace / ".llm-mcp", target_is_directory=True)
    return {"hashes": _hashes(workspace), "outside": _hashes(outside), "etc": os.stat("/etc").st_mtime_ns,
            "tiny": str(tiny_model)}


def _hashes(root: Path, skip: tuple[str, ...] = (".llm-mcp",)) -> dict[str, str]:
    """sha256 of every regular file under root (symbolic links not followed), by relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not (rel == Path(".") and d in skip)]
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                out[str(rel / name)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def call(mcp: McpSession, tool: str, args: dict[str, Any]) -> Any:
    return mcp.run(mcp.client.call_tool(tool, args), timeout=CALL_TIMEOUT)


@contextmanager
def quiet_logs(enabled: bool = True):
    """Skip the server's log records while a huge input is in flight: formatting a 5 MB message (the server
    logs unexpected errors with their text) takes seconds and is not what these tests look at."""
    if enabled:
        logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        if enabled:
            logging.disable(logging.NOTSET)


def _resolve(value: Any, state: dict[str, Any]) -> Any:
    """Fill the placeholders of the static case tables with this run's paths."""
    if value == "<tiny>":
        return state["tiny"]
    if isinstance(value, dict):
        return {k: _resolve(v, state) for k, v in value.items()}
    return value


def assert_clear_error(result: Any, names: tuple[str, ...], *, max_chars: int = MAX_ERROR_CHARS) -> str:
    text = text_of(result)
    assert result.is_error, f"expected a tool error, got success: {text[:300]}"
    assert text.strip(), "empty error text"
    assert "internal error in" not in text, f"unexpected exception reached the agent: {text[:400]}"
    assert any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", text) for n in names), \
        f"error does not name {names}: {text[:400]}"
    assert len(text) <= max_chars, f"error text is {len(text)} chars (echoes the input?): {text[:200]}..."
    return text


# -- 2. table cases from the schemas ------------------------------------------------------------------------------

# Arguments that are valid for each tool (so that one mutation is the only fault). Where a mutation could slip
# through, the baseline does only cheap work: a 1-token generation, a 1-row eval, or a train that the worker
# refuses because kept-run already holds a run.
BASE: dict[str, dict[str, Any]] = {
    "estimate_memory": {"model_name": "<tiny>"},
    "inspect_dataset": {"dataset": [{"text": "hello"}]},
}
for _fam, _mid in (("qloraevolved", KEEPER), ("unsloth", UKEEPER)):
    BASE.update({
        f"{_fam}_list_models": {},
        f"{_fam}_list_jobs": {},
        f"{_fam}_unload_model": {"model_id": "ghost"},  # never a real model: a slipped mutation must not unload
        f"{_fam}_training_status": {"model_id": KEEPER} if _fam == "qloraevolved" else {"job_id": "j-nope"},
        f"{_fam}_cancel_training": {"model_id": KEEPER} if _fam == "qloraevolved" else {"job_id": "j-nope"},
        f"{_fam}_generate": {"model_id": _mid, "prompt": "hi", "max_new_tokens": 1},
        f"{_fam}_evaluate": {"model_id": _mid, "eval_dataset": [{"text": "hello"}], "batch_size": 1},
        f"{_fam}_export": {"model_id": _mid, "output_dir": "kept-run", "verify": False},
    })
BASE.update({
    "qloraevolved_load_model": {"model_name": "<tiny>", "model_id": "bad-load", **FAST_LOAD},
    "unsloth_load_model": {"model_name": "<tiny>", "model_id": "bad-load", "max_seq_length": 128},
    "qloraevolved_prepare_for_training": {"model_id": KEEPER, **FAST_TRAIN, "output_dir": "kept-run", "max_steps": 2,
                                          "report_to": "none"},
    "unsloth_prepare_for_training": {"model_id": UKEEPER, "training_config": {"output_dir": "kept-run",
                                                                              "max_steps": 1}},
    "qloraevolved_train": {"model_id": KEEPER, "train_dataset": [{"text": "hello"}], "wait_seconds": 30,
                           "training_config": {"max_steps": 1}},  # nested: a top-level max_steps would win
    "unsloth_train": {"model_id": UKEEPER, "train_dataset": [{"text": "hello"}], "wait_seconds": 30,
                      "training_config": {"output_dir": "kept-run", "max_steps": 1}},
})
assert set(BASE) == set(SCHEMAS), set(BASE) ^ set(SCHEMAS)

_JSON_TYPE = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
              type(None): "null"}
WRONG_TYPE_POOL = [{"bogus": 1}, "not-a-number", 12345, 1.5, [1, 2]]


def _branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The alternatives of a (possibly nested) anyOf, flattened; a $ref counts as an object."""
    if "anyOf" in schema:
        return [b for s in schema["anyOf"] for b in _branches(s)]
    if "$ref" in schema:
        return [{"type": "object"}]
    return [schema]


def _accepts(types: set[str], value: Any) -> bool:
    kind = _JSON_TYPE[type(value)]
    return kind in types or (kind == "integer" and "number" in types)


def _numeric_bounds(schema: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, value) just outside each bound of the numeric branch."""
    out = []
    for b in _branches(schema):
        if b.get("type") not in ("integer", "number"):
            continue
        is_int = b["type"] == "integer"
        step = 1 if is_int else 1e-3
        if "minimum" in b:
            out.append(("below-min", b["minimum"] - step))
        if "exclusiveMinimum" in b:
            out.append(("at-exclusive-min", b["exclusiveMinimum"]))
        if "maximum" in b:
            out.append(("above-max", b["maximum"] + (step if is_int else max(step, abs(b["maximum"]) * 1e-3))))
        if "exclusiveMaximum" in b:
            out.append(("at-exclusive-max", b["exclusiveMaximum"]))
        if is_int and ("minimum" in b or "maximum" in b):
            out.append(("huge-int", 10**40))
    return out


MISSING = object()


def _mutations(props: dict[str, Any], required: list[str]) -> list[tuple[str, str, Any]]:
    """(label, param, value) for every parameter of a schema; value is the bad value (MISSING: leave out)."""
    out = []
    for param, schema in props.items():
        branches = _branches(schema)
        types = {b.get("type") for b in branches}
        wrong = [v for v in WRONG_TYPE_POOL if not _accepts(types, v)][:2]
        out += [(f"wrong-type-{_JSON_TYPE[type(v)]}", param, v) for v in wrong]
        out += [(label, param, v) for label, v in _numeric_bounds(schema)]
        if any("enum" in b for b in branches):
            out.append(("unknown-enum", param, f"not-a-valid-{param}"))
        if "string" in types:
            size = HUGE_PATH if param in PATH_PARAMS else HUGE_TEXT
            out.append((f"huge-string-{size // 1000}k", param, "a"))
        if "array" in types and any(b.get("items", {}).get("type") == "object" for b in branches):
            out.append(("too-many-rows", param, "rows"))
    out += [("missing", p, MISSING) for p in required]
    return out


def _materialise(label: str, value: Any) -> Any:
    if label.startswith("huge-string"):
        return value * (HUGE_PATH if label.endswith(f"{HUGE_PATH // 1000}k") else HUGE_TEXT)
    if label == "too-many-rows":
        return [{"text": "a"}] * (MAX_INLINE_ROWS + 1)
    return value


def _table_cases() -> list[Any]:
    cases = []
    for tool, schema in SCHEMAS.items():
        props, required = schema.get("properties", {}), schema.get("required", [])
        for label, param, value in _mutations(props, required):
            cases.append((tool, (param,), label, value))
        cases.append((tool, ("bogus_param",), "unknown-argument", 1))
        # nested: the unsloth training_config object, chat messages, and train's free-form overrides
        if tool == "unsloth_prepare_for_training":
            fields = schema["$defs"]["UnslothTrainingConfig"]["properties"]
            for label, param, value in _mutations(fields, []):
                if not label.startswith(("huge", "too-many")):
                    cases.append((tool, ("training_config", param), label, value))
        if tool.endswith("_train"):
            fields = (SCHEMAS["unsloth_prepare_for_training"]["$defs"]["UnslothTrainingConfig"]["properties"]
                      if tool.startswith("unsloth") else SCHEMAS["qloraevolved_prepare_for_training"]["properties"])
            for label, param, value in _mutations(fields, []):
                if param != "model_id" and not label.startswith(("huge", "too-many")):
                    cases.append((tool, ("training_config", param), label, value))
            cases.append((tool, ("training_config", "lr"), "unknown-key", 1e-3))
            cases.append((tool, ("training_config", "dataset_format"), "unknown-enum", "csv-ish"))
            cases.append((tool, ("training_config", "eval_steps"), "wrong-type-string", "often"))
        if tool.endswith("_generate"):
            cases.append((tool, ("messages", "role"), "unknown-enum", [{"role": "robot", "content": "hi"}]))
            cases.append((tool, ("messages", "content"), "missing", [{"role": "user"}]))
            cases.append((tool, ("messages", "content"), "wrong-type-object", [{"role": "user", "content": {"a": 1}}]))
            cases.append((tool, ("messages",), "empty-list", []))
            cases.append((tool, ("prompt",), "both-prompt-and-messages", "both"))
    return cases


def _case_id(tool: str, path: tuple[str, ...], label: str) -> str:
    return f"{tool}:{'.'.join(path)}:{label}"


def _table_params() -> list[Any]:
    params = []
    for tool, path, label, value in _table_cases():
        params.append(pytest.param(tool, path, label, value, id=_case_id(tool, path, label)))
    return params


def _build_args(tool: str, path: tuple[str, ...], label: str, value: Any, state: dict[str, Any]) -> dict[str, Any]:
    args = json.loads(json.dumps(_resolve(BASE[tool], state)))
    if path[0] == "messages":
        args.pop("prompt", None)
        args["messages"] = value
        return args
    if label == "both-prompt-and-messages":
        args["messages"] = [{"role": "user", "content": "hi"}]
        return args
    if len(path) == 2:
        nested = dict(args.get(path[0]) or {})
        nested[path[1]] = _materialise(label, value)
        args[path[0]] = nested
        return args
    (param,) = path
    if value is MISSING:
        args.pop(param, None)
    else:
        args[param] = _materialise(label, value)
    return args


@pytest.mark.parametrize("tool, path, label, value", _table_params())
def test_table_case(mcp, state, tool, path, label, value):
    """One bad argument (wrong type, out of range, unknown enum, missing, unknown extra, huge, too many rows):
    a tool error that names the parameter; no model comes or goes."""
    COUNTS["table"] += 1
    args = _build_args(tool, path, label, value, state)
    with quiet_logs(label.startswith("huge")):
        result = call(mcp, tool, args)
    try:
        if label == "both-prompt-and-messages":
            assert_clear_error(result, ("prompt", "messages"))
        elif len(path) == 2:  # a nested field: named with its parent, e.g. training_config.r or messages.0.role
            text = assert_clear_error(result, (path[-1],))
            assert re.search(rf"{path[0]}\.(\d+\.)?{path[1]}(?![A-Za-z0-9_])", text), text[:400]
        else:
            assert_clear_error(result, path)
    finally:
        _drop_strays(mcp)


def _drop_strays(mcp: McpSession) -> None:
    """Unload any model a slipped-through call loaded, so one bad case cannot cascade into others."""
    for family in ("qloraevolved", "unsloth"):
        answer = call(mcp, f"{family}_list_models", {}).structured_content
        models = answer["models"] if family == "qloraevolved" else answer
        for model_id in models:
            if model_id not in (KEEPER, UKEEPER):
                call(mcp, f"{family}_unload_model", {"model_id": model_id})


def test_table_covers_every_tool_and_parameter(mcp):
    """The live server's schemas are the ones the cases were generated from, and every parameter has cases."""
    live = {name: tool.input_schema for name, tool in mcp.tools().items()}
    assert live == SCHEMAS
    covered = {(tool, path[0]) for tool, path, _, _ in _table_cases()}
    for tool, schema in SCHEMAS.items():
        for param in schema.get("properties", {}):
            assert (tool, param) in covered, (tool, param)


# -- 3. paths ----------------------------------------------------------------------------------------------------

# (tool, parameter path, kind, baseline). kind: "read" (datasets, models) or "write" (output folders).
PATH_TARGETS: list[tuple[str, tuple[str, ...], str, dict[str, Any]]] = [
    ("qloraevolved_load_model", ("model_name",), "model", {"model_id": "bad-path", **FAST_LOAD}),
    ("unsloth_load_model", ("model_name",), "model", {"model_id": "bad-path", "max_seq_length": 128}),
    ("estimate_memory", ("model_name",), "model", {}),
    ("inspect_dataset", ("dataset",), "read", {}),
    ("qloraevolved_train", ("train_dataset",), "read", {"model_id": KEEPER, "max_steps": 1, "wait_seconds": 30}),
    ("qloraevolved_train", ("eval_dataset",), "read", {"model_id": KEEPER, "train_dataset": [{"text": "hi"}],
                                                       "max_steps": 1, "wait_seconds": 30}),
    ("unsloth_train", ("train_dataset",), "read", {"model_id": UKEEPER, "wait_seconds": 30,
                                                   "training_config": {"max_steps": 1, "output_dir": "kept-run"}}),
    ("unsloth_train", ("eval_dataset",), "read", {"model_id": UKEEPER, "train_dataset": [{"text": "hi"}],
                                                  "wait_seconds": 30,
                                                  "training_config": {"max_steps": 1, "output_dir": "kept-run"}}),
    ("qloraevolved_evaluate", ("eval_dataset",), "read", {"model_id": KEEPER, "batch_size": 1}),
    ("unsloth_evaluate", ("eval_dataset",), "read", {"model_id": UKEEPER, "batch_size": 1}),
    ("qloraevolved_prepare_for_training", ("output_dir",), "write", {"model_id": KEEPER, **FAST_TRAIN,
                                                                     "max_steps": 2, "report_to": "none"}),
    ("unsloth_prepare_for_training", ("training_config", "output_dir"), "write",
     {"model_id": UKEEPER, "training_config": {"max_steps": 1}}),
    ("qloraevolved_train", ("output_dir",), "write", {"model_id": KEEPER, "train_dataset": [{"text": "hi"}],
                                                      "max_steps": 1, "wait_seconds": 30}),
    ("unsloth_train", ("training_config", "output_dir"), "write",
     {"model_id": UKEEPER, "train_dataset": [{"text": "hi"}], "wait_seconds": 30, "training_config": {"max_steps": 1}}),
    ("qloraevolved_train", ("resume_from_checkpoint",), "write",
     {"model_id": KEEPER, "train_dataset": [{"text": "hi"}], "max_steps": 1, "wait_seconds": 30}),
    ("unsloth_train", ("training_config", "resume_from_checkpoint"), "write",
     {"model_id": UKEEPER, "train_dataset": [{"text": "hi"}], "wait_seconds": 30,
      "training_config": {"max_steps": 1, "output_dir": "kept-run"}}),
    ("qloraevolved_export", ("output_dir",), "write", {"model_id": KEEPER, "verify": False}),
    ("unsloth_export", ("output_dir",), "write", {"model_id": UKEEPER, "verify": False}),
]

# label -> value template; {out} is the outside folder's name (a sibling of the workspace under pytest's basetemp),
# {outside} its absolute path, {ws} the workspace. The workspace holds `escape` -> the outside folder.
READ_VALUES = {
    "dotdot-etc-passwd": "../../etc/passwd",
    "abs-etc": "/etc/passwd",
    "abs-outside": "{outside}/data.jsonl",
    "dotdot-sibling": "../{out}/data.jsonl",
    "inside-then-out": "kept-run/../../{out}/data.jsonl",
    "symlink-out": "escape/data.jsonl",
    "home": "~/.bashrc",
}
MODEL_VALUES = {
    "dotdot-etc": "../../etc",
    "abs-etc": "/etc",
    "abs-outside": "{outside}",  # holds a config.json
    "dotdot-sibling": "../{out}",
    "symlink-out": "escape",
    "home": "~",
}
WRITE_VALUES = {
    "dotdot-etc": "../../etc",
    "abs-etc": "/etc",
    "abs-outside": "{outside}/new-out",
    "dotdot-sibling": "../{out}/new-out",
    "inside-then-out": "kept-run/../../{out}/new-out",
    "symlink-out": "escape/new-out",
    "home": "~/llm-mcp-bad-input-out",
    "workspace-abs": "{ws}",
    "workspace-dot": ".",
    "state-folder": ".llm-mcp",
    "state-subfolder": ".llm-mcp/logs",
    "dotdot-into-state": "kept-run/../.llm-mcp/new-out",
    "symlink-to-state": "statelink/new-out",
}
def _path_params() -> list[Any]:
    params = []
    for tool, path, kind, base in PATH_TARGETS:
        values = {"read": READ_VALUES, "model": MODEL_VALUES, "write": WRITE_VALUES}[kind]
        for label, template in values.items():
            case_id = f"{tool}:{'.'.join(path)}:{label}"
            params.append(pytest.param(tool, path, kind, base, template, id=case_id))
    return params


@pytest.mark.parametrize("tool, path, kind, base, template", _path_params())
def test_path_case(mcp, state, workspace, outside, tool, path, kind, base, template):
    """A path out of the workspace (or onto its state) is refused, naming the parameter and the workspace or
    --allow-read; nothing appears outside the workspace."""
    COUNTS["path"] += 1
    value = template.format(out=outside.name, outside=outside, ws=workspace)
    args = json.loads(json.dumps(_resolve(base, state)))
    if len(path) == 2:
        args[path[0]] = {**args.get(path[0], {}), path[1]: value}
    else:
        args[path[0]] = value
    target = Path(os.path.expanduser(value if os.path.isabs(os.path.expanduser(value)) else workspace / value))
    existed = os.path.lexists(os.path.normpath(target))
    try:
        result = call(mcp, tool, args)
        text = assert_clear_error(result, (path[-1],))
        assert "workspace" in text or "--allow-read" in text, text[:400]
    finally:
        assert _hashes(outside) == state["outside"], "the outside folder changed"
        if not existed:
            assert not os.path.lexists(os.path.normpath(target)), f"{target} was created"
        _drop_strays(mcp)


NEITHER_LOCAL_NOR_HUB = {  # names no file system holds and the hub would not accept as an id
    "one-overlong-name": "a" * 300,
    "overlong-last-part": "owner/" + "b" * 300 + ".jsonl",
    "missing-deep-path": "no/such/folder/data",
    "spaces": "my training data",
}


@pytest.mark.parametrize("tool, path, base, value", [
    pytest.param(tool, path, base, value, id=f"{tool}:{'.'.join(path)}:{label}")
    for tool, path, kind, base in PATH_TARGETS if kind in ("read", "model")
    for label, value in NEITHER_LOCAL_NOR_HUB.items()])
def test_neither_a_local_path_nor_a_hub_id(mcp, state, tool, path, base, value):
    """A dataset or model name that is no existing local path and no valid hub id is refused by the server with
    what is allowed (the fuzz once reached the file system with a 300-character name: an internal error)."""
    COUNTS["path"] += 1
    args = json.loads(json.dumps(_resolve(base, state)))
    if len(path) == 2:
        args[path[0]] = {**args.get(path[0], {}), path[1]: value}
    else:
        args[path[0]] = value
    try:
        text = assert_clear_error(call(mcp, tool, args), (path[-1],))
        assert "hub id" in text, text[:400]
    finally:
        _drop_strays(mcp)


IN_THE_WAY = [  # (tool, parameter, value, extra args); kept-run/final holds files
    ("qloraevolved_train", "output_dir", "kept-run/final/adapter_model.safetensors", {}),
    ("qloraevolved_train", "output_dir", "kept-run/final/README.md/sub", {}),
    ("qloraevolved_train", "resume_from_checkpoint", "kept-run/final/README.md", {"output_dir": "in-the-way-run"}),
    ("qloraevolved_train", "resume_from_checkpoint", "kept-run/final", {"output_dir": "in-the-way-run"}),
    ("qloraevolved_export", "output_dir", "kept-run/final/README.md", {"verify": False}),
    ("qloraevolved_export", "output_dir", "kept-run/final/README.md/sub", {"verify": False}),
    ("qloraevolved_export", "output_dir", "kept-run/checkpoint-2", {"verify": False}),
    ("qloraevolved_evaluate", "eval_dataset", "kept-run/final/adapter_model.safetensors", {}),
    ("inspect_dataset", "dataset", ".llm-mcp/jobs.sqlite", {}),
    ("inspect_dataset", "dataset", "kept-run", {}),
]


@pytest.mark.parametrize("tool, param, value, extra", [
    pytest.param(*case, id=f"{case[0]}:{case[1]}:{case[2]}") for case in IN_THE_WAY])
def test_path_with_a_file_in_the_way(mcp, state, workspace, tool, param, value, extra):
    """Paths inside the workspace that point at files (or through them) where a folder is meant, or at data that
    is not a dataset: a clear error naming the parameter, and the file is untouched."""
    COUNTS["path"] += 1
    args: dict[str, Any] = {} if tool == "inspect_dataset" else {"model_id": KEEPER}
    if tool == "qloraevolved_train":
        args.update(train_dataset=[{"text": "hi"}], training_config={"max_steps": 1}, wait_seconds=30)
    args.update(extra)
    args[param] = value
    try:
        assert_clear_error(call(mcp, tool, args), (param,))
    finally:
        now = _hashes(workspace)
        assert all(now.get(f) == h for f, h in state["hashes"].items()), "a file written before changed"


# -- 4. remote code and tokens -----------------------------------------------------------------------------------

def test_trust_remote_code_is_refused(mcp, state):
    result = call(mcp, "qloraevolved_load_model", {"model_name": state["tiny"], "model_id": "remote",
                                                   "trust_remote_code": True, **FAST_LOAD})
    text = assert_clear_error(result, ("trust_remote_code",))
    assert "--allow-remote-code" in text
    assert "remote" not in call(mcp, "qloraevolved_list_models", {}).structured_content["models"]


def test_token_never_leaks(mcp, state, workspace):
    """unsloth_load_model(token=...) on the tiny folder, and bad calls carrying the token: the token is in no
    answer, no list_models and no file of the workspace (logs and jobs.sqlite included)."""
    answers: list[str] = []

    def record(tool: str, args: dict[str, Any]) -> Any:
        result = call(mcp, tool, args)
        answers.append(text_of(result))
        answers.append(json.dumps(result.structured_content))
        return result

    loaded = record("unsloth_load_model", {"model_name": state["tiny"], "model_id": "tokened", "token": TOKEN,
                                           "max_seq_length": 128})
    try:
        for tool in ("unsloth_list_models", "qloraevolved_list_models", "unsloth_list_jobs"):
            record(tool, {})
        bad_calls = [
            {"model_name": state["tiny"], "model_id": "tokened", "token": TOKEN},  # id taken
            {"model_name": state["tiny"], "model_id": "bad/id", "token": TOKEN},
            {"model_name": state["tiny"], "max_seq_length": 1, "token": TOKEN},
            {"model_name": "../../etc", "token": TOKEN},
            {"model_name": "no-such-org/no-such-model", "model_id": "tok-hub", "token": TOKEN},  # offline hub
            {"model_name": state["tiny"], "token": TOKEN, "tokne": TOKEN},
        ]
        for args in bad_calls:
            assert record("unsloth_load_model", args).is_error, args
        if not loaded.is_error:
            record("unsloth_generate", {"model_id": "tokened", "prompt": "hi", "max_new_tokens": 1})
            record("unsloth_training_status", {"model_id": "tokened"})
    finally:
        if not loaded.is_error:
            record("unsloth_unload_model", {"model_id": "tokened"})
        _drop_strays(mcp)
    leaks = [a[:300] for a in answers if TOKEN in a]
    assert not leaks, leaks
    files = [p for p in workspace.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".log" for p in files) and any(p.name == "jobs.sqlite" for p in files)
    leaked_files = [str(p) for p in files if TOKEN.encode() in p.read_bytes()]
    assert not leaked_files, leaked_files


def test_token_of_the_wrong_type_is_not_echoed(mcp, state):
    for token in ([TOKEN], {"value": TOKEN}):
        result = call(mcp, "unsloth_load_model", {"model_name": state["tiny"], "token": token})
        assert_clear_error(result, ("token",))
        assert TOKEN not in text_of(result)


def test_inline_rows_over_the_byte_limit(mcp, state):
    """Rows within MAX_INLINE_ROWS but over MAX_INLINE_BYTES (33 rows of 1 MB) are refused, naming the parameter."""
    COUNTS["table"] += 1
    rows = [{"text": "a" * 1_000_000}] * (MAX_INLINE_BYTES // 1_000_000 + 1)
    with quiet_logs():
        result = call(mcp, "inspect_dataset", {"dataset": rows})
    text = assert_clear_error(result, ("dataset",))
    assert "bytes" in text


def test_cross_family_and_taken_ids_leave_models_alone(mcp, state):
    """A model of one family cannot be unloaded, replaced or trained through the other family's tools, nor
    replaced by a load that reuses its id."""
    for tool, model_id in (("unsloth_unload_model", KEEPER), ("qloraevolved_unload_model", UKEEPER)):
        assert_clear_error(call(mcp, tool, {"model_id": model_id}), ("model_id",))
    for tool, args in (("qloraevolved_load_model", {"model_name": state["tiny"], "model_id": UKEEPER, **FAST_LOAD}),
                       ("unsloth_load_model", {"model_name": state["tiny"], "model_id": KEEPER}),
                       ("qloraevolved_load_model", {"model_name": state["tiny"], "model_id": KEEPER, **FAST_LOAD})):
        assert "already loaded" in assert_clear_error(call(mcp, tool, args), ("model_id",))
    assert_clear_error(call(mcp, "unsloth_train", {"model_id": KEEPER, "train_dataset": [{"text": "hi"}]}),
                       ("model_id",))
    assert_clear_error(call(mcp, "qloraevolved_export", {"model_id": UKEEPER, "output_dir": "x-export"}),
                       ("model_id",))
    assert KEEPER in call(mcp, "qloraevolved_list_models", {}).structured_content["models"]
    assert UKEEPER in call(mcp, "unsloth_list_models", {}).structured_content


# -- 5. overwrite rules ------------------------------------------------------------------------------------------

def test_overwrite_rules(mcp, state, demo_rows):
    """kept-run holds a run: training into it again without overwrite_output_dir, or exporting into it (or its
    final adapter) without overwrite, is refused and names output_dir."""
    result = call(mcp, "qloraevolved_train", {"model_id": KEEPER, "train_dataset": demo_rows, "output_dir": "kept-run",
                                              "max_steps": 1, "wait_seconds": 30})
    text = assert_clear_error(result, ("output_dir",))
    assert "overwrite_output_dir" in text
    result = call(mcp, "qloraevolved_train", {"model_id": KEEPER, "train_dataset": demo_rows, "max_steps": 1,
                                              "training_config": {"overwrite_output_dir": False}, "wait_seconds": 30})
    assert_clear_error(result, ("output_dir",))
    for folder in ("kept-run", "kept-run/final"):
        result = call(mcp, "qloraevolved_export", {"model_id": KEEPER, "output_dir": folder, "verify": False})
        text = assert_clear_error(result, ("output_dir",))
        assert "overwrite" in text


# -- 6. fuzz -----------------------------------------------------------------------------------------------------

PATHISH = ["../../etc/passwd", "/etc", "/etc/passwd", "~/.ssh/id_rsa", "~", "escape/secret.txt", "escape",
           ".llm-mcp", ".llm-mcp/jobs.sqlite", ".", "..", "", "   ", "kept-run/../../x", "a\x00b", "a/../../..",
           "C:\\Windows\\system32", "\\\\server\\share", "file:///etc/passwd", "./nope-dir/x.jsonl", "/dev/zero",
           "/proc/self/environ", "nope/" * 20]
LONG = st.builds(lambda ch, n: ch * n, st.sampled_from(["a", "\u00e9", "/", "../", "\u202e", "\U0001f600", " "]),
                 st.sampled_from([257, MAX_PATH_CHARS + 1, 70_000, 250_000]))
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=2**200)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40) | st.sampled_from(PATHISH) | LONG)
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                         max_size=4), max_leaves=10)
UNKNOWN_IDS = ["ghost", "keeper-2", "KEEPER", "keeper ", "../keeper", "bad/id", "", "x" * 200, "\u00fcnicode-id"]
# "keeper" only where a call, valid or not, is cheap and cannot train, export, unload or generate at length
SAFE_WITH_KEEPER = {"qloraevolved_prepare_for_training", "qloraevolved_training_status",
                    "qloraevolved_cancel_training", "inspect_dataset"}
SAFE_WITH_UKEEPER = {"unsloth_prepare_for_training", "unsloth_training_status", "unsloth_cancel_training"}
ROWS = st.lists(st.dictionaries(st.sampled_from(["text", "prompt", "completion", "instruction", "input", "output",
                                                 "messages", "x"]), SCALARS, max_size=3), max_size=4)


def _valid_like(tool: str, param: str, schema: dict[str, Any]) -> st.SearchStrategy:
    """Values that look right for the parameter (and often are), chosen so a valid call does only cheap work."""
    options = []
    for b in _branches(schema):
        kind = b.get("type")
        if "enum" in b:
            options.append(st.sampled_from(b["enum"]))
        elif kind == "integer":
            lo, hi = b.get("minimum", -(2**31)), b.get("maximum", 2**31)
            options.append(st.integers(lo, hi) | st.sampled_from([lo, hi]))
        elif kind == "number":
            lo, hi = b.get("minimum", b.get("exclusiveMinimum", -1e6)), b.get("maximum", b.get("exclusiveMaximum", 1e6))
            options.append(st.floats(lo, hi, allow_nan=False) | st.sampled_from([lo, hi]))
        elif kind == "boolean":
            options.append(st.booleans())
        elif kind == "null":
            options.append(st.none())
        elif kind == "array":
            options.append(ROWS if b.get("items", {}).get("type") == "object" else
                           st.lists(st.text(max_size=12) | st.sampled_from(["q_proj", "v_proj"]), max_size=3))
        elif kind == "object":
            options.append(st.dictionaries(st.sampled_from(["learning_rate", "max_steps", "output_dir", "optim", "r",
                                                            "dataset_format", "resume_from_checkpoint", "lr"]),
                                           JUNK, max_size=3))
        elif kind == "string":
            if param == "model_id":
                ids = list(UNKNOWN_IDS)
                if tool in SAFE_WITH_KEEPER:
                    ids.append(KEEPER)
                if tool in SAFE_WITH_UKEEPER:
                    ids.append(UKEEPER)
                options.append(st.sampled_from(ids))
            elif param == "model_name":
                hub = ["no-such-org/no-such-model", "gpt2"] if tool == "estimate_memory" else []
                options.append(st.sampled_from(PATHISH + hub) | LONG)
            elif param in PATH_PARAMS:
                options.append(st.sampled_from(PATHISH + ["fuzz-out/run"]) | LONG)
            else:
                options.append(st.text(max_size=60) | LONG)
    return st.one_of(options) if options else JUNK


def _tool_args(tool: str) -> st.SearchStrategy:
    props = SCHEMAS[tool].get("properties", {})
    optional = {p: st.one_of(_valid_like(tool, p, s), JUNK) for p, s in props.items()}
    extras = st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k not in props), JUNK, max_size=2)
    return st.builds(lambda a, e: {**a, **e}, st.fixed_dictionaries({}, optional=optional),
                     st.one_of(st.just({}), st.just({}), extras))




@pytest.mark.parametrize("tool", sorted(SCHEMAS))
@settings(max_examples=6, deadline=None, database=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(data=st.data())
def test_fuzz_tool_arguments(mcp, state, tool, data):
    """Random argument dicts (valid-looking and junk values, random subsets, unknown keys): a success or a tool
    error with a clear, non-internal message; the server then still answers and keeper is still loaded."""
    args = data.draw(_tool_args(tool), label="args")
    if tool.endswith(("_train", "_export", "_evaluate", "_generate", "_unload_model")):
        assume(args.get("model_id") not in (KEEPER, UKEEPER))  # never real work on, or unloading of, the models
    COUNTS["fuzz"] += 1
    try:
        result = call(mcp, tool, args)
        text = text_of(result)
        if result.is_error:
            assert text.strip(), "empty error text"
            assert "internal error in" not in text, f"internal error: {text[:500]}"
    finally:
        assert KEEPER in call(mcp, "qloraevolved_list_models", {}).structured_content["models"]
        assert UKEEPER in call(mcp, "unsloth_list_models", {}).structured_content
        _drop_strays(mcp)


# -- 7. afterwards -----------------------------------------------------------------------------------------------

def test_zz_everything_survived(mcp, state, workspace, outside):
    """Runs last: the server answers, keeper and ukeeper are loaded and usable, every file written before has its
    bytes, the outside folder and /etc are unchanged; prints the number of cases tried."""
    models = call(mcp, "qloraevolved_list_models", {}).structured_content["models"]
    assert models[KEEPER]["state"] in ("ready", "prepared"), models[KEEPER]
    assert call(mcp, "unsloth_list_models", {}).structured_content[UKEEPER]["state"] in ("ready", "prepared")
    generated = call(mcp, "qloraevolved_generate", {"model_id": KEEPER, "prompt": "hi", "max_new_tokens": 2})
    assert not generated.is_error, text_of(generated)
    now = _hashes(workspace)
    changed = [f for f, h in state["hashes"].items() if now.get(f) != h]
    assert not changed, changed
    assert _hashes(outside) == state["outside"]
    assert os.stat("/etc").st_mtime_ns == state["etc"]
    assert not os.path.lexists(os.path.expanduser("~/llm-mcp-bad-input-out"))
    total = sum(COUNTS.values())
    print(f"\nBAD-INPUT CASES: {total} (table {COUNTS['table']}, path {COUNTS['path']}, fuzz {COUNTS['fuzz']}); "
          f"new files since setup: {sorted(set(now) - set(state['hashes']))}")


def test_tool_errors_carry_structured_content(mcp, tiny_model):
    """Every refusal is an isError result whose structured content names error_type, parameter, allowed and
    message, and whose text says the same: the SDK's own schema checks, our checks, and a missing model alike."""
    def error(tool, args):
        result = mcp.call(tool, args)
        assert result.is_error
        found = result.structured_content
        assert set(found) == {"error_type", "parameter", "allowed", "message"}
        assert found["message"] == result.content[0].text
        return found

    bound = error("estimate_memory", {"model_name": "m", "num_processes": 0})  # the input schema's bound
    assert bound["error_type"] == "InvalidArgument" and bound["parameter"] == "num_processes"
    assert bound["allowed"] == ">= 1" and "num_processes=0" in bound["message"]
    enum = error("estimate_memory", {"model_name": "m", "method": "ppo"})
    assert enum["parameter"] == "method" and "'grpo'" in enum["allowed"]
    mcp.ok("qloraevolved_load_model", {"model_name": str(tiny_model), "model_id": "errs", **FAST_LOAD})
    ours = error("qloraevolved_train", {"model_id": "errs", "train_dataset": [{"text": "a"}],
                                        "training_config": {"method": "grpo", "rewards": [{"type": "python"}]}})
    assert ours["error_type"] == "InvalidArgument" and ours["parameter"] == "rewards[0].type"
    assert "exact_match" in ours["allowed"]
    missing = error("qloraevolved_generate", {"model_id": "none-such", "prompt": "hi"})
    assert missing["error_type"] == "ModelNotLoaded" and missing["parameter"] == "model_id"
    unknown = error("qloraevolved_list_models", {"bogus": 1})
    assert unknown["parameter"] == "bogus" and "one of the tool's arguments" in unknown["allowed"]
