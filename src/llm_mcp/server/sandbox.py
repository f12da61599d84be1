"""Where the agent's paths may point: writes stay inside the workspace, reads inside the workspace, the folders
the operator allowed (--allow-read) and the Hugging Face cache. Paths are resolved (`..`, symbolic links) before
they are judged, and relative ones start at the workspace, as the workers' working directory does.

The agent may be steered by untrusted text (a dataset row, a web page), so a refusal says which server option
would allow the path rather than trusting the call.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_mcp.errors import InvalidArgument
from llm_mcp.paths import adapter_base, stat_kind

MAX_PATH_CHARS = 4096
# Inline rows travel in the JSON of one tool call: past these, a file in the workspace is the better carrier.
MAX_INLINE_ROWS = 50_000
MAX_INLINE_BYTES = 32 * 1024 * 1024
# huggingface_hub's repo id rule (optional namespace, names of 1-96 of [A-Za-z0-9_.-]); datasets may add ':split'.
_HUB_ID = re.compile(r"(?:[\w.-]{1,96}/)?[\w.-]{1,96}")
_SPLIT = re.compile(r"[\w.\[\]:%+-]{1,128}")


def huggingface_cache() -> Path:
    """The hub cache, as huggingface_hub finds it (HF_HUB_CACHE, HF_HOME, or ~/.cache/huggingface)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser()


@dataclass(frozen=True)
class Sandbox:
    workspace: Path
    allow_read: tuple[Path, ...] = ()

    @classmethod
    def create(cls, workspace: str, allow_read: tuple[str, ...] = ()) -> "Sandbox":
        root = Path(workspace).expanduser().resolve()
        extra = tuple(Path(p).expanduser().resolve() for p in allow_read) + (huggingface_cache().resolve(),)
        return cls(root, extra)

    def resolve(self, param: str, value: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise InvalidArgument(param, value, "a non-empty path")
        if len(value) > MAX_PATH_CHARS or "\x00" in value:
            raise InvalidArgument(param, value, f"a path of at most {MAX_PATH_CHARS} characters, without NUL")
        path = Path(value).expanduser()
        try:
            return (path if path.is_absolute() else self.workspace / path).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop, a component too long
            raise InvalidArgument(param, value, f"a resolvable path ({type(exc).__name__}: {exc})") from None

    def writable(self, param: str, value: str) -> Path:
        """A folder the server may write: inside the workspace, and not the workspace itself or its state."""
        path = self.resolve(param, value)
        for part in (path, *path.parents):
            if part.exists() and not part.is_dir():
                raise InvalidArgument(param, value, f"a folder path; {part} is a file")
        if not _inside(path, self.workspace):
            raise InvalidArgument(param, value, f"a path inside the workspace {self.workspace} (it resolves to "
                                                f"{path}); start the server with --workspace set to a folder "
                                                f"that contains it to write there")
        if path == self.workspace or _inside(path, self.workspace / ".llm-mcp"):
            raise InvalidArgument(param, value, "a sub-folder of the workspace, not the workspace itself or its "
                                                ".llm-mcp state folder")
        return path

    def readable(self, param: str, value: str) -> Path:
        path = self.resolve(param, value)
        if _inside(path, self.workspace) or any(_inside(path, root) for root in self.allow_read):
            return path
        raise InvalidArgument(param, value, f"a path inside the workspace {self.workspace} or a folder allowed "
                                            f"with --allow-read (it resolves to {path}); restart the server with "
                                            f"--allow-read {path.parent} to allow it")

    def looks_local(self, value: str) -> bool:
        """Whether a model or dataset name means a local path rather than a hub id."""
        if value.startswith((".", "/", "~", "\\")) or ".." in Path(value).parts:
            return True
        return stat_kind(self.workspace / value) is not None

    def dataset(self, param: str, source: Any) -> Any:
        """Check a dataset argument: a path must be readable (returned resolved), inline rows within the size
        limits; a hub id passes as is."""
        if isinstance(source, list):
            if len(source) > MAX_INLINE_ROWS:
                raise InvalidArgument(param, f"{len(source)} rows", f"at most {MAX_INLINE_ROWS} inline rows; "
                                                                     "write larger data to a .jsonl file in the "
                                                                     "workspace and pass its path")
            size = _json_size(source)
            if size > MAX_INLINE_BYTES:
                raise InvalidArgument(param, f"{size} bytes of inline rows", f"at most {MAX_INLINE_BYTES} bytes "
                                                                             "inline; pass a .jsonl file path")
            return source
        if isinstance(source, str) and self.looks_local(source):
            return str(self.readable(param, source))  # resolved: the server's cwd is not the workspace
        if isinstance(source, str):
            name, colon, split = source.partition(":")
            if not _HUB_ID.fullmatch(name) or (colon and not _SPLIT.fullmatch(split)):
                raise InvalidArgument(param, source, self._not_found("file, saved-dataset folder",
                                                                     "'owner/name' or 'owner/name:split'"))
        return source

    def model_source(self, param: str, name: str) -> str:
        """A local model folder or .gguf file must be readable (returned resolved), and so must the base model a
        LoRA adapter folder names; a hub id passes as is."""
        if self.looks_local(name):
            path = self.readable(param, name)
            base = adapter_base(path)
            if base is not None and self.looks_local(base):
                try:
                    self.readable(param, base)
                except InvalidArgument as exc:
                    raise InvalidArgument(param, name, f"an adapter folder whose base model, {base!r} in its "
                                                       f"adapter_config.json, may be read too ({exc})") from None
            return str(path)
        if not _HUB_ID.fullmatch(name):
            raise InvalidArgument(param, name, self._not_found("model folder", "'owner/name'"))
        return name

    def _not_found(self, local: str, hub: str) -> str:
        # Checked here, not left to the worker: a name that is neither could reach the file system as an
        # over-long path, or the hub as a malformed id.
        return (f"an existing local {local} (relative paths start at the workspace {self.workspace}) or a hub "
                f"id like {hub} (names of 1-96 letters, digits, '_', '.', '-')")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _json_size(rows: list[Any]) -> int:
    import json

    return len(json.dumps(rows, default=str))
