"""Tool errors as the agent reads them: an isError result whose text is one sentence and whose structured content
names error_type, parameter, allowed and message (ERROR_SCHEMA), for our errors and for arguments the SDK's own
schema validation refuses (whose raw pydantic text is rewritten to name each field and what it allows)."""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.types import CallToolResult, TextContent
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS
from pydantic import ValidationError

from llm_mcp.errors import InvalidArgument, LlmMcpError, shown

ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error_type": {"type": "string", "description": "The kind of error: InvalidArgument, ModelNotLoaded, "
                                                        "DatasetError, TrainingFailed, DiskFull, ... or InternalError."},
        "parameter": {"type": ["string", "null"], "description": "The parameter at fault, when one is."},
        "allowed": {"type": ["string", "null"], "description": "What the parameter allows, when known."},
        "message": {"type": "string", "description": "What went wrong and what to do, in a sentence."},
    },
    "required": ["error_type", "message"],
}


def error_result(error_type: str, message: str, parameter: str | None = None,
                 allowed: str | None = None) -> CallToolResult:
    structured = {"error_type": error_type, "parameter": parameter, "allowed": allowed, "message": message}
    return CallToolResult(content=[TextContent(type="text", text=message)], structured_content=structured,
                          is_error=True)


def from_error(exc: LlmMcpError) -> CallToolResult:
    """One of our errors (errors.py): InvalidArgument carries its parameter and what it allows."""
    return error_result(type(exc).__name__, str(exc), getattr(exc, "name", None), getattr(exc, "allowed", None))


def from_validation(tool: str, exc: ValidationError) -> CallToolResult:
    """The SDK refused the arguments against the tool's input schema: each field, what it got, what it allows."""
    parts, first, allowed = [], None, None
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).endswith("Arguments")) or "arguments"
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidArgument):
            text, expected = str(cause).rstrip("."), cause.allowed
        elif err.get("type") == "missing":
            text, expected = f"{loc} is required", None
        else:
            expected = _expected(err)
            text = f"{loc}={shown(err.get('input'))} is not valid; expected {expected}"
        parts.append(text)
        first, allowed = first or loc, allowed or expected
    return error_result("InvalidArgument", f"{tool}: " + "; ".join(parts) + ".", first, allowed)


def _expected(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return str(ctx["expected"])
    bounds = [f"{op} {ctx[key]}" for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"),
                                                  ("max_length", "length <="), ("min_length", "length >="))
              if key in ctx]
    return " and ".join(bounds) if bounds else str(err.get("msg", "a valid value")).lower()


def without_titles(schema: Any) -> Any:
    """A JSON Schema without its "title" annotations (property names under properties/$defs are kept)."""
    if isinstance(schema, list):
        return [without_titles(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: without_titles(sub) for name, sub in value.items()}
        else:
            out[key] = without_titles(value)
    return out


class LlmMcpServer(MCPServer):
    """MCPServer whose refused arguments come back as structured tool errors, like the tools' own errors, and whose
    prompts/get refusals (an unknown prompt, a missing argument) are JSON-RPC invalid-params errors (-32602)."""

    async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None, context: Any = None) -> Any:
        prompt = self._prompt_manager.get_prompt(name)
        if prompt is None:
            known = sorted(p.name for p in self._prompt_manager.list_prompts())
            raise MCPError(INVALID_PARAMS, f"unknown prompt {name!r}; the prompts are {known}")
        missing = sorted(a.name for a in prompt.arguments or [] if a.required and a.name not in (arguments or {}))
        if missing:
            raise MCPError(INVALID_PARAMS, f"prompt {name!r} needs the argument(s) {missing}")
        return await super().get_prompt(name, arguments, context)

    async def list_tools(self) -> list[Any]:
        """The tools, their schemas without pydantic's generated "title" annotations (a field's name already says
        it: about a fifth of every agent's tool list saved)."""
        return [tool.model_copy(update={"input_schema": without_titles(tool.input_schema),
                                        "output_schema": without_titles(tool.output_schema)})
                for tool in await super().list_tools()]

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc, UnexpectedToolError) or not isinstance(exc.__cause__, ValidationError):
                raise
            return from_validation(name, exc.__cause__)
