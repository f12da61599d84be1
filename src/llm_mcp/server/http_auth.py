"""Who may talk to the HTTP transport: the static bearer token, OAuth access tokens, the bind-address rule and
Host/Origin checks.

Tokens are checked by the SDK's own bearer middleware (`token_verifier=` + `AuthSettings`): the static one with a
constant-time compare, OAuth's JWTs by server/oauth.py, either accepted when both are configured. With OAuth the
SDK also serves the RFC 9728 protected resource metadata and names it in every 401's WWW-Authenticate.
A token is never logged, echoed or written: keep it out of every message and repr here.
Nothing here touches stdio, where the client owns the server process and no token applies.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.transport_security import TransportSecuritySettings

from llm_mcp.config import OAuthConfig

TOKEN_ENV = "LLM_MCP_TOKEN"
CLIENT_ID = "llm-mcp-bearer"  # the one principal a static token stands for
# The SDK requires an issuer URL, but advertises it only with an authorization server or a resource_server_url,
# and we configure neither: a static token has no issuer.
_UNUSED_ISSUER = "http://127.0.0.1"
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class StaticTokenVerifier:
    """A `TokenVerifier` that accepts exactly one bearer token, compared in constant time."""

    def __init__(self, token: str, scopes: Sequence[str] = ()) -> None:
        assert token, "an empty token would accept 'Authorization: Bearer ' alone"
        self._expected = token.encode()
        self._scopes = list(scopes)  # beside OAuth: the required scopes (the static token is the operator's own)

    def __repr__(self) -> str:  # never show the token
        return "StaticTokenVerifier(token=***)"

    async def verify_token(self, token: str) -> AccessToken | None:
        if not hmac.compare_digest(token.encode(), self._expected):
            return None
        return AccessToken(token=token, client_id=CLIENT_ID, scopes=list(self._scopes))


class AnyTokenVerifier:
    """The first verifier's answer that accepts the token (the static token first: a cheap constant-time compare)."""

    def __init__(self, *verifiers: TokenVerifier) -> None:
        self._verifiers = verifiers

    def __repr__(self) -> str:
        return f"AnyTokenVerifier{self._verifiers!r}"

    async def verify_token(self, token: str) -> AccessToken | None:
        for verifier in self._verifiers:
            if (access := await verifier.verify_token(token)) is not None:
                return access
        return None


def bearer_auth(token: str | None, oauth: OAuthConfig | None) -> dict[str, Any]:
    """MCPServer's `token_verifier=` and `auth=` for a static token, OAuth, both (either token passes) or neither
    ({}: no auth). OAuth reads a local JWKS file here, once."""
    if oauth is None:
        return {"token_verifier": StaticTokenVerifier(token), "auth": auth_settings()} if token else {}
    from llm_mcp.server.oauth import JwtTokenVerifier

    verifier: TokenVerifier = JwtTokenVerifier(oauth)
    if token:
        verifier = AnyTokenVerifier(StaticTokenVerifier(token, oauth.required_scopes), verifier)
    return {"token_verifier": verifier, "auth": auth_settings(oauth)}


def auth_settings(oauth: OAuthConfig | None = None) -> AuthSettings:
    """Without OAuth: bearer auth on /mcp with no scopes and no metadata routes (there is no authorization server).
    With it: the SDK's resource server (the protected resource metadata route, resource_metadata in
    WWW-Authenticate, 403 insufficient_scope); the verifier checks the audience itself."""
    if oauth is None:
        return AuthSettings(issuer_url=_UNUSED_ISSUER, resource_server_url=None, required_scopes=None)
    return AuthSettings(issuer_url=oauth.issuer, resource_server_url=oauth.resource_url,
                        required_scopes=list(oauth.required_scopes) or None, validate_token_resource=False)


def default_resource_url(host: str, port: int) -> str:
    """The server's own URL, the default OAuth resource (behind a proxy or on a wildcard bind: --resource-url)."""
    return f"http://{_host_port(host.strip('[]'), port)}/mcp"


def normalize_token(token: str | None) -> str | None:
    """None for a missing or blank token (an empty LLM_MCP_TOKEN means no token, not an empty password)."""
    token = (token or "").strip()
    return token or None


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, token: str | None, oauth: bool = False) -> str | None:
    """Why serving HTTP on `host` must not start, or None: any non-loopback bind needs a token or OAuth."""
    if token or oauth or is_loopback(host):
        return None
    return (f"refusing to serve HTTP on non-loopback host {host!r} without a bearer token: anyone who can reach it "
            f"could load models and run training. Pass --token TOKEN (or set {TOKEN_ENV}; the environment keeps it "
            "out of the process list), or OAuth's --auth-issuer with its JWKS, or bind --host 127.0.0.1.")


def transport_security(host: str, port: int, public_url: str | None = None) -> TransportSecuritySettings:
    """DNS-rebinding protection for any bind address: only Host/Origin values naming this server pass, and the
    host of `public_url` (OAuth's --resource-url: a reverse proxy forwards its Host)."""
    names = list(_LOOPBACK_NAMES) if is_loopback(host) or host in _WILDCARD_HOSTS else []
    if host in _WILDCARD_HOSTS:  # clients reach a wildcard bind by this machine's own names and addresses
        names += _machine_names()
    elif host not in names:
        names.append(host.strip("[]"))
    hosts = [_host_port(name, port) for name in dict.fromkeys(names)]
    if port == 80:  # a client leaves the default port out of Host
        hosts += [h.rsplit(":", 1)[0] for h in hosts]
    public = urlsplit(public_url) if public_url else None
    if public and public.hostname:  # host:port, and the bare host when the port is the scheme's default
        default = 443 if public.scheme == "https" else 80
        with_port = _host_port(public.hostname, public.port or default)
        hosts = list(dict.fromkeys([*hosts, with_port] + ([with_port.rsplit(":", 1)[0]]
                                                          if (public.port or default) == default else [])))
    origins = [f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                                     allowed_origins=origins)


def _host_port(name: str, port: int) -> str:
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def _machine_names() -> list[str]:
    """This machine's host names, their addresses and the primary outbound address (for a wildcard bind).

    A client using another address of a multi-homed machine is refused (421): bind that address instead.
    """
    hostname = socket.gethostname()
    names = [hostname, socket.getfqdn()]
    try:
        names += [str(info[4][0]) for info in socket.getaddrinfo(hostname, None)]
    except OSError:  # an unresolvable hostname still leaves the names themselves
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # UDP connect sends nothing; it only picks the outbound interface
            names.append(probe.getsockname()[0])
    except OSError:  # no IPv4 route at all
        pass
    return [n.split("%", 1)[0] for n in names if n]


class QueryStringRedactor(logging.Filter):
    """Drops the query string from uvicorn's access-log lines: a client may put a token there (it is refused, but
    the line would still carry it). uvicorn logs (client, method, path with query, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?<redacted>", *args[3:])
        return True
