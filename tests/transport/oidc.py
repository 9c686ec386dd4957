"""A minimal OIDC identity provider for the OAUTHBEARER tests, on loopback.

It does what a real provider does for Kafka's client-credentials flow and nothing more:
``POST /token`` with a client id and secret (form fields or HTTP basic) answers an RS256
JWT access token (``sub``, ``iat``, ``exp``, ``scope``); its public key is written as a JWKS
file the broker validates signatures with (Kafka reads ``file:`` JWKS URLs). A wrong secret
is a 401, as from any provider.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import RSAKey

CLIENT_ID, CLIENT_SECRET = "llmpipe-worker", "oidc-client-secret"
KEY_ID = "llmpipe-test-key"


@dataclass
class Provider:
    url: str
    jwks: Path
    issued: list[dict[str, object]] = field(default_factory=list)

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/token"


def _credentials(handler: BaseHTTPRequestHandler, form: dict[str, list[str]]) -> tuple[str, str]:
    header = handler.headers.get("Authorization", "")
    if header.startswith("Basic "):
        user, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        return urllib.parse.unquote(user), urllib.parse.unquote(secret)
    return form.get("client_id", [""])[0], form.get("client_secret", [""])[0]


@contextmanager
def running_provider(directory: Path) -> Iterator[Provider]:
    key = RSAKey.generate_key(2048, parameters={"kid": KEY_ID, "use": "sig", "alg": "RS256"})
    jwks = directory / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    provider = Provider("", jwks)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            client_id, secret = _credentials(self, form)
            if form.get("grant_type") != ["client_credentials"] or (client_id, secret) != (
                CLIENT_ID,
                CLIENT_SECRET,
            ):
                self._answer(401, {"error": "invalid_client"})
                return
            now = int(time.time())
            claims = {"sub": client_id, "iat": now, "exp": now + 3600}
            claims["scope"] = form.get("scope", [""])[0]
            token = jwt.encode({"alg": "RS256", "kid": KEY_ID, "typ": "JWT"}, claims, key)
            provider.issued.append(claims)
            body = {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
            self._answer(200, body)

        def _answer(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    provider.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="oidc", daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
