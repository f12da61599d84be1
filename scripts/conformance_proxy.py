"""A loopback reverse proxy for the MCP conformance suite (scripts/conformance.sh), which cannot send headers.

Every request is forwarded to UPSTREAM with `Authorization: Bearer $LLM_MCP_TOKEN` set (any Authorization the
client sent is replaced); responses, SSE streams included, come back byte for byte as the server sends them, and a
client that hangs up closes its upstream request too (so the server sees the disconnect, as it would directly).

Host and Origin are rewritten only where they name this proxy itself (localhost / 127.0.0.1 / [::1] at the listen
port): those become the same name at the upstream port, so the server's DNS-rebinding check sees what a direct
client would send. Any other Host or Origin (e.g. the suite's evil.example.com) passes through unchanged, so the
server, not the proxy, has to refuse it.

    LLM_MCP_TOKEN=... python scripts/conformance_proxy.py --port 9001 --upstream http://127.0.0.1:9000

The token is read from the environment only (arguments show in the process list) and is never printed.
Needs uvicorn and httpx2, which the MCP Python SDK 2.x already installs.
"""

from __future__ import annotations

import argparse
import os
import sys
from urllib.parse import urlsplit

import anyio
import httpx2
import uvicorn

_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
# hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself
_DROP_REQUEST = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
                 b"upgrade", b"authorization", b"content-length"}
_DROP_RESPONSE = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
                  b"upgrade"}


class Proxy:
    def __init__(self, upstream: str, listen_port: int, token: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.port:
            raise SystemExit(f"--upstream must be http://HOST:PORT, got {upstream!r}")
        self.base = f"http://{parts.hostname if ':' not in parts.hostname else f'[{parts.hostname}]'}:{parts.port}"
        self.upstream_port = parts.port
        self.listen_port = listen_port
        self.authorization = f"Bearer {token}".encode()
        # no timeouts on reads: an SSE stream may stay silent for as long as the client keeps it open
        self.client = httpx2.AsyncClient(timeout=httpx2.Timeout(None, connect=10.0), follow_redirects=False,
                                         trust_env=False)

    def _rewrite(self, value: bytes, *, origin: bool) -> bytes:
        """`name:listen_port` (Host) or `http://name:listen_port` (Origin) -> the same name at the upstream port."""
        text = value.decode("latin-1")
        prefix = "http://" if origin else ""
        for name in _LOOPBACK:
            if text.lower() == f"{prefix}{name}:{self.listen_port}":
                return f"{prefix}{name}:{self.upstream_port}".encode("latin-1")
        return value

    def _request_headers(self, raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        headers = []
        for key, value in raw:
            key = key.lower()
            if key in _DROP_REQUEST:
                continue
            if key in (b"host", b"origin"):
                value = self._rewrite(value, origin=key == b"origin")
            headers.append((key, value))
        headers.append((b"authorization", self.authorization))
        return headers

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:  # MCP request bodies are small JSON documents: read them whole, then forward
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope.get("raw_path") or scope["path"].encode()
        url = self.base + path.decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        request = self.client.build_request(scope["method"], url, headers=self._request_headers(scope["headers"]),
                                            content=bytes(body))
        try:
            response = await self.client.send(request, stream=True)
        except httpx2.HTTPError as exc:
            message = f"conformance_proxy: upstream unreachable: {type(exc).__name__}\n".encode()
            await send({"type": "http.response.start", "status": 502,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(message)).encode())]})
            await send({"type": "http.response.body", "body": message})
            return
        broken: BaseException | None = None
        try:
            headers = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in _DROP_RESPONSE]
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            async with anyio.create_task_group() as group:
                async def hang_up_with_client() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()  # the client left: stop reading, close the upstream stream

                async def relay() -> None:
                    nonlocal broken
                    try:
                        async for chunk in response.aiter_raw():  # raw: no decoding, exactly the server's bytes
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        await send({"type": "http.response.body", "body": b""})
                    except httpx2.HTTPError as exc:  # the server broke its stream off
                        broken = exc
                    except OSError:  # the client went away mid-write
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(hang_up_with_client)
                group.start_soon(relay)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()
        if broken is not None:  # break ours off too: uvicorn drops the connection of an app that raises mid-response
            raise RuntimeError(f"upstream stream broke: {type(broken).__name__}") from broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT of the MCP server")
    args = parser.parse_args(argv)
    token = (os.environ.get("LLM_MCP_TOKEN") or "").strip()
    if not token:
        print("conformance_proxy: set LLM_MCP_TOKEN to the server's bearer token", file=sys.stderr)
        return 2
    proxy = Proxy(args.upstream, args.port, token)
    config = uvicorn.Config(proxy, host=args.host, port=args.port, log_level="warning", lifespan="on",
                            server_header=False, date_header=False)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
