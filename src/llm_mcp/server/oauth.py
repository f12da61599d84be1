"""OAuth 2.1 resource server: verify JWT access tokens against the issuer's JWKS (a URL, or a local file).

`JwtTokenVerifier` is a `TokenVerifier` for the SDK's bearer middleware, which answers 401 (with
`WWW-Authenticate: Bearer ... resource_metadata=...`) when it returns None, and 403 insufficient_scope when the
token lacks a required scope. A token passes only when it is signed by a key of the JWKS with that key's own
asymmetric algorithm (never 'none', never a shared secret), and its `iss`, `aud`, `exp` and `nbf` hold.
Tokens and keys never reach a log or an error message: refusals log a fixed reason only.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import jwt
from mcp.server.auth.provider import AccessToken
from pydantic import AnyHttpUrl, ValidationError

from llm_mcp.config import OAuthConfig

log = logging.getLogger(__name__)

LEEWAY_S = 30  # clock skew allowed on exp, nbf and iat
MAX_TOKEN_CHARS = 16_384  # a longer bearer value is refused unparsed
JWKS_CACHE_S = 300  # a JWKS URL is fetched again after this; an unknown kid refetches at most every 30 s
_ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES256K", "ES384", "ES512",
                         "EdDSA"})
# why a token was refused, by PyJWT's exception: a fixed text, so nothing of the token reaches the log
_REASONS: dict[type[Exception], str] = {
    jwt.ExpiredSignatureError: "expired", jwt.ImmatureSignatureError: "not valid yet",
    jwt.InvalidAudienceError: "wrong audience", jwt.InvalidIssuerError: "wrong issuer",
    jwt.MissingRequiredClaimError: "a required claim is missing", jwt.InvalidSignatureError: "bad signature",
    jwt.InvalidAlgorithmError: "algorithm not the key's", jwt.PyJWKClientConnectionError: "JWKS unreachable",
    jwt.PyJWKClientError: "no key for its kid", jwt.DecodeError: "malformed"}


class JwtTokenVerifier:
    """Accepts JWT access tokens of one issuer and audience; their scopes go to the SDK's scope check."""

    def __init__(self, config: OAuthConfig, *, leeway: float = LEEWAY_S) -> None:
        self._issuer = config.issuer
        self._audience = config.audience
        self._leeway = leeway
        self._client = jwt.PyJWKClient(config.jwks_url, lifespan=JWKS_CACHE_S, timeout=10) if config.jwks_url else None
        self._keys = [] if config.jwks_url else read_jwks_file(config.jwks_file or "")

    def __repr__(self) -> str:
        return f"JwtTokenVerifier(issuer={self._issuer!r}, audience={self._audience!r})"

    async def verify_token(self, token: str) -> AccessToken | None:
        if self._client is None:  # local keys: no I/O
            return self.verify(token)
        return await anyio.to_thread.run_sync(self.verify, token)  # PyJWKClient fetches with blocking urllib

    def verify(self, token: str) -> AccessToken | None:
        """The token's AccessToken, or None (the reason logged at INFO, without the token)."""
        if len(token) > MAX_TOKEN_CHARS:
            log.info("bearer token refused: too long")
            return None
        try:
            key = self._signing_key(jwt.get_unverified_header(token).get("kid"))
            claims = jwt.decode(token, key, algorithms=[key.algorithm_name], issuer=self._issuer,
                                audience=self._audience, leeway=self._leeway,
                                options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError as exc:
            reason = next((text for kind, text in _REASONS.items() if isinstance(exc, kind)), "invalid")
            log.log(logging.WARNING if isinstance(exc, jwt.PyJWKClientConnectionError) else logging.INFO,
                    "bearer token refused: %s", reason)
            return None
        except Exception as exc:  # a malformed key or claim type: refuse, naming only the kind of error
            log.warning("bearer token refused: %s while verifying it", type(exc).__name__)
            return None
        return _access_token(token, claims, self._audience, self._leeway)

    def _signing_key(self, kid: Any) -> jwt.PyJWK:
        if self._client is not None:  # the cached set; an unknown kid refetches it (at most every 30 s)
            key = (self._client.get_signing_key(kid) if isinstance(kid, str)
                   else _only_key(_usable(self._client.get_jwk_set().keys)))
        else:
            key = (next((k for k in self._keys if k.key_id == kid), None) if isinstance(kid, str)
                   else _only_key(self._keys))
        if key is None:
            raise jwt.PyJWKClientError("no signing key matches the token's kid")
        if key.algorithm_name not in _ASYMMETRIC or key.key_type == "oct":
            raise jwt.InvalidAlgorithmError("only asymmetric signing keys are trusted")
        return key


def _usable(keys: list[jwt.PyJWK]) -> list[jwt.PyJWK]:
    """Public signing keys: `use` sig or unset, an asymmetric algorithm."""
    return [k for k in keys if k.public_key_use in (None, "sig") and k.key_type != "oct"
            and k.algorithm_name in _ASYMMETRIC]


def _only_key(keys: list[jwt.PyJWK]) -> jwt.PyJWK | None:
    """A token without a kid may use the JWKS's key only when there is exactly one."""
    return keys[0] if len(keys) == 1 else None


def _access_token(token: str, claims: dict[str, Any], audience: str, leeway: float) -> AccessToken:
    """The verified claims as the SDK's AccessToken: the principal is (client_id, iss, sub), so a session stays
    with whoever opened it across token refreshes; expires_at is the last second accepted (exp + leeway)."""
    client_id = next((str(claims[c]) for c in ("client_id", "azp", "cid", "sub") if claims.get(c)), "unknown")
    subject = claims.get("sub")
    return AccessToken(token=token, client_id=client_id, scopes=token_scopes(claims), claims=claims,
                       subject=None if subject is None else str(subject), resource=audience,
                       expires_at=int(claims["exp"]) + int(leeway))  # int(exp): as PyJWT reads it


def token_scopes(claims: dict[str, Any]) -> list[str]:
    """The granted scopes: `scope` (a space-separated string, RFC 9068) and `scp` (a list or a string)."""
    scopes: list[str] = []
    for value in (claims.get("scope"), claims.get("scp")):
        if isinstance(value, str):
            scopes += value.split()
        elif isinstance(value, list):
            scopes += [s for s in value if isinstance(s, str)]
    return list(dict.fromkeys(scopes))


def read_jwks_file(path: str) -> list[jwt.PyJWK]:
    """The public signing keys of a JWKS JSON file ({"keys": [...]}); ValueError naming what is wrong (no key
    material: a file holding private keys is refused, since this server needs only the public halves)."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read a JWKS JSON file ({type(exc).__name__})") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError('not a JWKS: expected {"keys": [...]} with at least one key')
    if any(isinstance(e, dict) and ("d" in e or "k" in e) for e in entries):
        raise ValueError("it holds private or symmetric key material: give the issuer's public keys only")
    try:
        keys = _usable(list(jwt.PyJWKSet(entries)))
    except jwt.PyJWTError:
        keys = []
    if not keys:
        raise ValueError(f"no usable public signing key (RSA, EC or OKP with an algorithm among "
                         f"{', '.join(sorted(_ASYMMETRIC))})")
    return keys


def oauth_problem(config: OAuthConfig) -> str | None:
    """Why this OAuth configuration cannot serve, or None (the JWKS file is read to check it)."""
    for option, url in (("--auth-issuer", config.issuer), ("--resource-url", config.resource_url),
                        ("--auth-jwks-url", config.jwks_url)):
        if url is not None and (problem := _url_problem(url, https=option == "--auth-jwks-url")):
            return f"{option} {url!r}: {problem}"
    if not config.audience.strip():
        return "--auth-audience: empty"
    if (config.jwks_url is None) == (config.jwks_file is None):
        return "--auth-issuer needs exactly one of --auth-jwks-url URL or --auth-jwks-file PATH (the issuer's keys)"
    if config.jwks_file is not None:
        try:
            read_jwks_file(config.jwks_file)
        except ValueError as exc:
            return f"--auth-jwks-file {config.jwks_file!r}: {exc}"
    return None


def _url_problem(url: str, *, https: bool) -> str | None:
    """An http(s) URL with a host, no fragment; with `https`, plain http only to a loopback host (the keys that
    decide who may train must not come over a channel anyone on the path can rewrite)."""
    try:
        AnyHttpUrl(url)  # as the SDK's AuthSettings and metadata will read it
        parts = urlsplit(url)
    except (ValidationError, ValueError):
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        return "expected an http(s) URL with a host and no #fragment"
    if https and parts.scheme == "http" and not _loopback(parts.hostname):
        return "must be https (plain http only to a loopback host)"
    return None


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
