"""`llm-mcp serve --transport streamable-http --auth-issuer ...`: an OAuth 2.1 resource server accepting the
issuer's JWT access tokens (server/oauth.py), through the SDK's bearer middleware and RFC 9728 metadata route.

The key pairs are made here; the server runs as a subprocess on 127.0.0.1 with the JWKS as a local file or served
by a small http.server thread. Every wait is bounded and every server is stopped in a finally.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from conftest import serving_http, wait_for

ISSUER = "https://auth.example.test"  # never contacted: the keys come from the JWKS file or the local JWKS URL
AUDIENCE = "llm-mcp-test"
SCOPE = "mcp:tools"
KID = "test-key-1"
STATIC = "static-s3cret"
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "test-oauth", "version": "0"}}}
MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


# -- keys and tokens ----------------------------------------------------------------------------------------------
def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


KEY = _rsa()  # the issuer's key, in the JWKS
STRANGER = _rsa()  # a key the server does not know


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    return {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    """A valid access token's claims; a change to None drops that claim."""
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "client_id": "test-client", "iat": now, "nbf": now,
            "exp": now + 600, "scope": f"openid {SCOPE}"}
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


def token(key: Any = None, kid: str | None = KID, algorithm: str = "RS256", **changes: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**changes), key or KEY, algorithm=algorithm, headers=headers)


def tampered() -> str:
    """A valid token whose payload is swapped for one with another subject, the signature kept."""
    head, _, signature = token().split(".")
    return ".".join([head, _b64(json.dumps(claims(sub="admin")).encode()), signature])


def unsigned() -> str:
    """alg 'none' with the right kid and claims."""
    header = _b64(json.dumps({"alg": "none", "kid": KID, "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims()).encode())}."


def hmac_with_public_key() -> str:
    """HS256 keyed with the issuer's public key (the classic algorithm-confusion forgery)."""
    pem = KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = ".".join(_b64(json.dumps(p).encode()) for p in ({"alg": "HS256", "kid": KID}, claims()))
    return f"{signing_input}.{_b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"


@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("oauth-keys") / "jwks.json"
    path.write_text(json.dumps({"keys": [_jwk(KEY, KID)]}))
    return path


def _post_initialize(url: str, bearer: str | None) -> httpx2.Response:
    auth = {"Authorization": f"Bearer {bearer}"} if bearer is not None else {}
    return httpx2.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **auth}, timeout=10)


def _tool_names(url: str, bearer: str) -> set[str]:
    async def session() -> set[str]:
        async with (create_mcp_http_client(headers={"Authorization": f"Bearer {bearer}"}) as http,
                    Client(streamable_http_client(url, http_client=http)) as client):
            return {t.name for t in (await client.list_tools()).tools}

    return asyncio.run(asyncio.wait_for(session(), 20))


def _metadata_url(url: str) -> str:
    return url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")


# -- a server with a JWKS file and a required scope ---------------------------------------------------------------
@pytest.fixture(scope="module")
def oauth_server(tmp_path_factory: pytest.TempPathFactory, jwks_file: Path) -> Iterator[tuple[str, Path]]:
    """A live OAuth-protected HTTP server (JWKS file, scope mcp:tools required); yields (url, log)."""
    workspace = tmp_path_factory.mktemp("oauth-workspace")
    log = tmp_path_factory.mktemp("oauth-log") / "server.log"
    with serving_http("--workspace", str(workspace), "--auth-issuer", ISSUER, "--auth-audience", AUDIENCE,
                      "--auth-jwks-file", str(jwks_file), "--auth-scopes", SCOPE, "--log-level", "DEBUG",
                      log=log) as server:
        yield server.url, log


def test_valid_token_lists_tools_through_the_sdk_client(oauth_server):
    url, _ = oauth_server
    assert {"qloraevolved_load_model", "qloraevolved_train"} <= _tool_names(url, token())


def test_scp_list_carries_the_scope_too(oauth_server):
    url, _ = oauth_server
    assert _post_initialize(url, token(scope=None, scp=[SCOPE])).status_code == 200


REFUSED = {
    "expired": lambda: token(exp=int(time.time()) - 300, iat=int(time.time()) - 900, nbf=int(time.time()) - 900),
    "not yet valid": lambda: token(nbf=int(time.time()) + 600),
    "wrong audience": lambda: token(aud="someone-else"),
    "no audience": lambda: token(aud=None),
    "wrong issuer": lambda: token(iss="https://evil.example.test"),
    "no expiry": lambda: token(exp=None),
    "tampered payload": tampered,
    "signed by another key under our kid": lambda: token(key=STRANGER),
    "unknown kid": lambda: token(key=STRANGER, kid="stranger"),
    "no kid": lambda: token(kid=None, key=STRANGER),
    "alg none": unsigned,
    "HS256 with the public key": hmac_with_public_key,
    "malformed": lambda: "not.a.jwt",
    "garbage": lambda: "x" * 40,
    "no token": lambda: None,
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_tokens_get_401_pointing_at_the_resource_metadata(oauth_server, case):
    url, _ = oauth_server
    answer = _post_initialize(url, REFUSED[case]())
    assert answer.status_code == 401, (case, answer.status_code, answer.text)
    challenge = answer.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge, challenge
    assert f'resource_metadata="{_metadata_url(url)}"' in challenge, challenge


def test_token_without_the_required_scope_gets_403(oauth_server):
    url, _ = oauth_server
    answer = _post_initialize(url, token(scope="openid profile"))
    assert answer.status_code == 403, answer.text
    challenge = answer.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge and f'resource_metadata="{_metadata_url(url)}"' in challenge
    assert answer.json()["error"] == "insufficient_scope"


def test_protected_resource_metadata_names_the_issuer(oauth_server):
    url, _ = oauth_server
    answer = httpx2.get(_metadata_url(url), timeout=10)  # public: no token needed
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"resource": url, "authorization_servers": [ISSUER], "scopes_supported": [SCOPE],
                             "bearer_methods_supported": ["header"]}


def test_tokens_are_not_logged(oauth_server):
    """Refused and accepted tokens: none appears in the server's output (which does log each request)."""
    url, log = oauth_server
    sent = [token(), token(aud="someone-else"), tampered()]
    logged = log.read_text().count("POST /mcp")
    assert [_post_initialize(url, t).status_code for t in sent] == [200, 401, 401]
    output = wait_for(lambda: (text := log.read_text()).count("POST /mcp") >= logged + 3 and text,
                      "the access log lines of the three requests", 30)
    assert "bearer token refused: wrong audience" in output  # the reason is logged, the token is not
    for sent_token in sent:
        for part in sent_token.split("."):
            assert part not in output


# -- a JWKS URL, beside a static token ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jwks_url() -> Iterator[tuple[str, list[str]]]:
    """The JWKS served over http on 127.0.0.1; yields (url, the paths requested so far)."""
    requested: list[str] = []
    body = json.dumps({"keys": [_jwk(KEY, KID)]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/jwks.json", requested
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def url_server(tmp_path_factory: pytest.TempPathFactory, jwks_url) -> Iterator[str]:
    """OAuth with the JWKS URL and the audience defaulting to the resource URL, plus a static token."""
    workspace = tmp_path_factory.mktemp("oauth-url-workspace")
    log = tmp_path_factory.mktemp("oauth-url-log") / "server.log"
    with serving_http("--workspace", str(workspace), "--auth-issuer", ISSUER, "--auth-jwks-url", jwks_url[0],
                      log=log, env={"LLM_MCP_TOKEN": STATIC}) as server:
        yield server.url


def test_jwks_url_verifies_tokens_and_is_fetched_once(url_server, jwks_url):
    url, (_, requested) = url_server, jwks_url
    good = token(aud=url)  # no --auth-audience: the resource URL is the audience
    assert {"qloraevolved_load_model"} <= _tool_names(url, good)
    assert _post_initialize(url, good).status_code == 200
    assert _post_initialize(url, token(aud=url, key=STRANGER)).status_code == 401
    assert _post_initialize(url, token()).status_code == 401  # aud llm-mcp-test is not this resource
    assert requested == ["/jwks.json"]  # cached: one fetch for every verification


def test_static_token_and_oauth_are_both_accepted(url_server):
    url = url_server
    assert _post_initialize(url, STATIC).status_code == 200
    assert _post_initialize(url, token(aud=url)).status_code == 200
    for wrong in (STATIC + "x", "wrong", token(aud=url, iss="https://evil.example.test")):
        answer = _post_initialize(url, wrong)
        assert answer.status_code == 401 and "resource_metadata=" in answer.headers["www-authenticate"]
    metadata = httpx2.get(_metadata_url(url), timeout=10).json()
    assert metadata["resource"] == url and metadata["authorization_servers"] == [ISSUER]


# -- the verifier itself, and the command line --------------------------------------------------------------------
def _verifier(keys_file: Path, **changes: Any):
    from llm_mcp.config import OAuthConfig
    from llm_mcp.server.oauth import JwtTokenVerifier

    values = {"issuer": ISSUER, "audience": AUDIENCE, "resource_url": "http://127.0.0.1:1/mcp",
              "jwks_file": str(keys_file), **changes}
    return JwtTokenVerifier(OAuthConfig(**values))


def test_verifier_allows_small_clock_skew_and_reads_scopes(jwks_file):
    verifier = _verifier(jwks_file)
    now = int(time.time())
    skewed = verifier.verify(token(exp=now - 10, nbf=now + 10, iat=now + 10))  # within the 30 s leeway
    assert skewed is not None and skewed.scopes == ["openid", SCOPE] and skewed.client_id == "test-client"
    assert skewed.subject == "user-1" and skewed.expires_at >= now  # the SDK's own expiry check lets it pass
    assert verifier.verify(token(exp=now - 120)) is None
    assert verifier.verify(token(aud=["other", AUDIENCE])).resource == AUDIENCE  # a list of audiences
    assert verifier.verify(token(scope=None, scp="a b")).scopes == ["a", "b"]
    assert "PRIVATE" not in repr(verifier) and KID not in repr(verifier)


REASONS = {"expired": "expired", "not yet valid": "not valid yet", "wrong audience": "wrong audience",
           "no audience": "a required claim is missing", "wrong issuer": "wrong issuer",
           "no expiry": "a required claim is missing", "tampered payload": "bad signature",
           "signed by another key under our kid": "bad signature", "unknown kid": "no key for its kid",
           "no kid": "bad signature", "alg none": "algorithm not the key's",
           "HS256 with the public key": "algorithm not the key's", "malformed": "malformed", "garbage": "malformed"}


@pytest.mark.parametrize("case", list(REASONS))
def test_verifier_refuses_each_bad_token_for_its_reason(jwks_file, case, caplog):
    """The same tokens as over HTTP, each refused for the reason it was built to fail on; the token never logged."""
    bad = REFUSED[case]()
    with caplog.at_level("INFO", logger="llm_mcp.server.oauth"):
        assert _verifier(jwks_file).verify(bad) is None
    assert [r.getMessage() for r in caplog.records] == [f"bearer token refused: {REASONS[case]}"]


def test_verifier_accepts_ec_keys_with_their_own_algorithm(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwks.json"
    jwk = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())), "kid": "ec"}
    path.write_text(json.dumps({"keys": [jwk]}))
    verifier = _verifier(path)
    assert verifier.verify(token(key=key, kid="ec", algorithm="ES256")) is not None
    assert verifier.verify(token(key=key, kid=None, algorithm="ES256")) is not None  # the one key: no kid needed
    head, payload, signature = token(key=key, kid="ec", algorithm="ES256").split(".")
    relabelled = _b64(json.dumps({**json.loads(base64.urlsafe_b64decode(head + "==")), "alg": "ES384"}).encode())
    assert verifier.verify(".".join([relabelled, payload, signature])) is None  # not the key's algorithm
    assert verifier.verify(token(kid="ec")) is None  # an RSA signature for the EC key


def test_unreachable_jwks_url_refuses_with_a_warning(caplog):
    from conftest import free_port

    verifier = _verifier(Path("unused"), jwks_file=None, jwks_url=f"http://127.0.0.1:{free_port()}/jwks.json")
    with caplog.at_level("INFO", logger="llm_mcp.server.oauth"):
        assert asyncio.run(verifier.verify_token(token())) is None
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("WARNING", "bearer token refused: JWKS "
                                                                                   "unreachable")]


def test_with_both_the_static_token_stands_for_every_required_scope(jwks_file):
    """Beside OAuth the static token is the operator's own: it carries the required scopes (no 403 for it)."""
    from llm_mcp.config import OAuthConfig
    from llm_mcp.server.http_auth import bearer_auth

    oauth = OAuthConfig(issuer=ISSUER, audience=AUDIENCE, resource_url="http://127.0.0.1:1/mcp",
                        jwks_file=str(jwks_file), required_scopes=(SCOPE, "b"))
    auth = bearer_auth(STATIC, oauth)
    verify = auth["token_verifier"].verify_token
    assert asyncio.run(verify(STATIC)).scopes == [SCOPE, "b"]
    assert asyncio.run(verify(token())).client_id == "test-client"
    assert asyncio.run(verify("wrong")) is None and STATIC not in repr(auth)
    settings = auth["auth"]
    assert settings.required_scopes == [SCOPE, "b"] and str(settings.resource_server_url) == oauth.resource_url
    assert bearer_auth(STATIC, None)["auth"].resource_server_url is None and bearer_auth(None, None) == {}


@pytest.mark.parametrize("argv, message", [
    (["--auth-issuer", ISSUER], "exactly one of --auth-jwks-url"),
    (["--auth-issuer", ISSUER, "--auth-jwks-url", "https://auth.example.test/jwks", "--auth-jwks-file", "JWKS"],
     "exactly one of --auth-jwks-url"),
    (["--auth-issuer", ISSUER, "--auth-jwks-url", "http://auth.example.test/jwks"], "must be https"),
    (["--auth-issuer", "not a url", "--auth-jwks-file", "JWKS"], "--auth-issuer 'not a url'"),
    (["--auth-issuer", ISSUER, "--auth-jwks-file", "MISSING"], "cannot read a JWKS JSON file"),
    (["--auth-issuer", ISSUER, "--auth-jwks-file", "PRIVATE"], "private or symmetric key material"),
    (["--auth-scopes", SCOPE], "--auth-scopes without --auth-issuer"),
    (["--resource-url", "https://mcp.example.test/mcp"], "--resource-url without --auth-issuer"),
    (["--host", "0.0.0.0", "--auth-issuer", ISSUER, "--auth-jwks-file", "JWKS"], "needs --resource-url"),
])
def test_cli_refuses_bad_oauth_options(argv, message, tmp_path, jwks_file, monkeypatch, capsys):
    from llm_mcp import cli

    for name in ("TOKEN", "AUTH_ISSUER", "AUTH_AUDIENCE", "AUTH_JWKS_URL", "AUTH_JWKS_FILE", "AUTH_SCOPES",
                 "RESOURCE_URL"):
        monkeypatch.delenv(f"LLM_MCP_{name}", raising=False)
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"keys": [json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY))]}))
    paths = {"JWKS": str(jwks_file), "MISSING": str(tmp_path / "nope.json"), "PRIVATE": str(private)}
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--transport", "streamable-http", "--workspace", str(tmp_path),
                  *[paths.get(a, a) for a in argv]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert '"d"' not in err and "PRIVATE KEY" not in err


def test_cli_oauth_alone_allows_a_non_loopback_host(tmp_path, jwks_file, monkeypatch):
    """OAuth counts as auth for a non-loopback bind; the public URL's host passes the Host/Origin checks."""
    from llm_mcp import cli

    monkeypatch.delenv("LLM_MCP_TOKEN", raising=False)
    seen: dict[str, Any] = {}

    def fake_create_server(config, *, token=None, closed=None):
        seen.update(config=config, token=token)

        class _Server:
            def streamable_http_app(self, **kwargs):
                from starlette.applications import Starlette

                seen.update(kwargs)
                return Starlette()

        return _Server()

    async def no_serve(self, *args, **kwargs) -> None:
        pass

    monkeypatch.setattr("llm_mcp.server.app.create_server", fake_create_server)
    monkeypatch.setattr("uvicorn.Server.serve", no_serve)
    assert cli.main(["serve", "--transport", "streamable-http", "--host", "0.0.0.0", "--port", "9123",
                     "--workspace", str(tmp_path), "--auth-issuer", ISSUER, "--auth-jwks-file", str(jwks_file),
                     "--auth-scopes", "a, b", "--resource-url", "https://mcp.example.test/mcp"]) == 0
    oauth = seen["config"].oauth
    assert seen["token"] is None and oauth.audience == oauth.resource_url == "https://mcp.example.test/mcp"
    assert oauth.required_scopes == ("a", "b") and oauth.issuer == ISSUER
    security = seen["transport_security"]
    assert {"mcp.example.test", "mcp.example.test:443"} <= set(security.allowed_hosts)
    assert "https://mcp.example.test" in security.allowed_origins


def test_the_mcp_layer_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, llm_mcp.server.oauth, llm_mcp.server.http_auth, llm_mcp.server.app; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
