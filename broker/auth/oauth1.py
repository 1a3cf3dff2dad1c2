"""``oauth1``: OAuth 1.0a (RFC 5849) through the sign-in popup; every API call signed by
the broker, which keeps the secrets that sign.

    auth_type: oauth1
    request_token_url: https://trello.com/1/OAuthGetRequestToken
    authorization_url: https://trello.com/1/OAuthAuthorizeToken
    access_token_url: https://trello.com/1/OAuthGetAccessToken
    signature_method: HMAC-SHA1        # HMAC-SHA256, RSA-SHA1, PLAINTEXT
    realm: null
    authorization_params: {name: My App, scope: "read,write", expiration: never}
    extra_fields: {user_id: user_id}   # kept from the token answer
    # the operator's, in config.yaml: client_id (consumer key), client_secret (consumer
    # secret; RSA-SHA1: rsa_private_key instead)

The flow: ``begin`` asks for temporary credentials (signed, with ``oauth_callback`` the
broker's redirect URI carrying the flow's ``state``) and seals them into the flow; the
browser goes to ``authorization_url`` with the temporary token; the callback brings back
that token (it must match) and ``oauth_verifier``; ``complete`` trades them for token
credentials. Stored: the token and its secret. A node gets the token (``access_token``),
the kept fields and ``signed_by_broker: true``, never the consumer secret or the token
secret (``hand_out_token_secret: true`` lets a provider's nodes have the latter); its calls
go through ``ctx.client`` or the proxy, which sign each request (Authlib's ``ClientAuth``;
form bodies are signed, other bodies are not, per RFC 5849). Tokens are not renewed: a
``refresh_on`` answer marks nothing (OAuth 1.0a has no refresh); the user reconnects.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import parse_qsl

import httpx
from authlib.oauth1 import ClientAuth
from authlib.oauth1.rfc5849.signature import generate_signature_base_string
from authlib.oauth1.rfc5849.util import escape
from pydantic import Field, SecretStr, model_validator

from ..apispec import Apply
from ..catalog import PopupProvider, ProviderBase
from ..integrations import Integration
from ..oauth.client import Borrowed
from ..oauth.flows import Flow, remember
from ..oauth.service import FlowFailed, single
from ..oauth.tokens import dig
from ..providers import popup_integration
from ..urltemplates import check_template
from .base import AuthKind

if TYPE_CHECKING:
    from ..runtime import Broker

__all__ = ["KIND", "OAuth1Kind", "OAuth1Provider", "Signer"]

MAX_ANSWER_BYTES = 64 * 1024
NODE_NOTE = "signed_by_broker"


def _sign_hmac_sha256(client: Any, request: Any) -> str:
    """HMAC-SHA256 (NetSuite's token-based auth): HMAC-SHA1's recipe with SHA-256."""
    key = f"{escape(client.client_secret or '')}&{escape(client.token_secret or '')}"
    digest = hmac.new(key.encode(), generate_signature_base_string(request).encode(),
                      hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


class Signer(ClientAuth):  # type: ignore[misc]
    """Authlib's OAuth 1 client signing, with HMAC-SHA256 added (for this class only)."""

    SIGNATURE_METHODS: ClassVar[dict[str, Any]] = {
        **ClientAuth.SIGNATURE_METHODS, "HMAC-SHA256": _sign_hmac_sha256,
    }

    def sign_request(self, request: httpx.Request) -> None:
        """Sign ``request`` in place (its ``Authorization`` header): a form body is part
        of the signature when it is in memory; a streamed one cannot be."""
        body = b""
        if request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ) and isinstance(request.stream, httpx.ByteStream):
            body = request.content
        headers = {"Content-Type": request.headers.get("content-type", "")} if body else {}
        _, signed, _ = self.prepare(request.method, str(request.url), headers, body)
        request.headers["Authorization"] = signed["Authorization"]


class OAuth1Provider(PopupProvider):
    """See the module docstring."""

    auth_type: Literal["oauth1"]
    request_token_url: str
    authorization_url: str
    access_token_url: str
    signature_method: Literal["HMAC-SHA1", "HMAC-SHA256", "RSA-SHA1", "PLAINTEXT"] = (
        "HMAC-SHA1"
    )
    realm: str | None = None
    authorization_params: dict[str, str] = Field(default_factory=dict)
    request_token_params: dict[str, str] = Field(default_factory=dict)
    extra_fields: dict[str, str] = Field(default_factory=dict)
    hand_out_token_secret: bool = False
    client_id: SecretStr | None = None
    client_secret: SecretStr | None = None
    rsa_private_key: SecretStr | None = None
    timeout_seconds: float = Field(default=15.0, gt=0, le=120)

    @model_validator(mode="after")
    def _oauth1(self) -> OAuth1Provider:
        if self.client_id is None:
            raise ValueError("client_id: the consumer key; set it in config.yaml")
        needs = "rsa_private_key" if self.signature_method == "RSA-SHA1" else "client_secret"
        if getattr(self, needs) is None:
            raise ValueError(f"{needs}: required for {self.signature_method}; set it in "
                             "config.yaml")
        for url in self.urls():
            check_template(url, self.settings, self.allowed_hosts)
        return self

    def urls(self) -> list[str]:
        return [self.request_token_url, self.authorization_url, self.access_token_url]

    def credential_names(self) -> set[str]:
        return {"access_token", NODE_NOTE, *self.settings, *self.extra_fields}

    def default_auth(self) -> Apply:
        return Apply()  # the signature is the credential: see Signer

    def signer(self, token: str | None = None, token_secret: str | None = None, *,
               callback: str | None = None, verifier: str | None = None) -> Signer:
        assert self.client_id is not None
        return Signer(
            self.client_id.get_secret_value(),
            client_secret=self.client_secret.get_secret_value() if self.client_secret else None,
            token=token, token_secret=token_secret, redirect_uri=callback,
            rsa_key=self.rsa_private_key.get_secret_value() if self.rsa_private_key else None,
            verifier=verifier, signature_method=self.signature_method, realm=self.realm,
        )


class OAuth1Kind(AuthKind):
    name = "oauth1"
    title = "OAuth 1.0a"
    connect = "popup"
    signs = True

    @property
    def spec(self) -> type[ProviderBase]:
        return OAuth1Provider

    def integration(self, spec: ProviderBase) -> Integration:
        assert isinstance(spec, OAuth1Provider)
        return popup_integration(spec)

    def node_view(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        view: dict[str, Any] = {"access_token": stored.get("access_token"), NODE_NOTE: True}
        if stored.get("hand_out_token_secret"):
            view["token_secret"] = stored.get("token_secret")
        view.update(stored.get("settings") or {})
        view.update(stored.get("extra") or {})
        return view

    def signer(
        self, spec: ProviderBase, stored: Mapping[str, Any]
    ) -> Callable[[httpx.Request], None] | None:
        assert isinstance(spec, OAuth1Provider)
        token, secret = stored.get("access_token"), stored.get("token_secret")
        if not isinstance(token, str) or not isinstance(secret, str):
            return None
        return spec.signer(token, secret).sign_request

    async def begin(self, broker: Broker, spec: ProviderBase, flow: Flow) -> str:
        assert isinstance(spec, OAuth1Provider)
        callback = str(httpx.URL(broker.settings.redirect_uri).copy_merge_params(
            {"state": flow.state}))
        url = spec.render_url(spec.request_token_url, flow.settings)
        answer = await _token_request(
            broker, spec, spec.signer(callback=callback), url, spec.request_token_params,
            what="temporary credentials",
        )
        token, secret = answer.get("oauth_token"), answer.get("oauth_token_secret")
        if not token or not secret or answer.get("oauth_callback_confirmed") != "true":
            raise FlowFailed(f"{spec.display_name} did not start the sign-in. Start again.",
                             integration=spec.name, status_code=502)
        async with broker.session() as db, db.begin():
            await remember(db, broker.keyring, flow, {"token": token, "secret": secret})
        return str(httpx.URL(spec.render_url(spec.authorization_url, flow.settings))
                   .copy_merge_params({**spec.authorization_params, "oauth_token": token}))

    async def complete(
        self, broker: Broker, spec: ProviderBase, flow: Flow,
        params: Mapping[str, list[str]], *, transport: httpx.AsyncBaseTransport,
    ) -> dict[str, Any]:
        assert isinstance(spec, OAuth1Provider)
        name, label = spec.name, spec.display_name
        token, verifier = single(params, "oauth_token", name), single(params, "oauth_verifier",
                                                                      name)
        expected = flow.extra.get("token")
        if not token or not verifier or not expected or not hmac.compare_digest(
            token, expected
        ):
            raise FlowFailed(f"{label} did not confirm the sign-in. Start again.",
                             integration=name)
        answer = await _token_request(
            broker, spec, spec.signer(token, flow.extra.get("secret"), verifier=verifier),
            spec.render_url(spec.access_token_url, flow.settings), {},
            what="token credentials", transport=transport,
        )
        access, secret = answer.get("oauth_token"), answer.get("oauth_token_secret")
        if not access or not secret:
            raise FlowFailed(f"{label} answered without a token.", integration=name,
                             status_code=502)
        extra = {k: dig(answer, path) for k, path in spec.extra_fields.items()}
        return {
            "access_token": access, "token_secret": secret, "token_type": "OAuth1",
            "expires_at": None, "lifetime": None,
            "hand_out_token_secret": spec.hand_out_token_secret,
            "settings": dict(flow.settings),
            "extra": {k: v for k, v in extra.items() if v is not None},
        }


async def _token_request(
    broker: Broker, spec: OAuth1Provider, signer: Signer, url: str, params: Mapping[str, str],
    *, what: str, transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, str]:
    """POST a signed OAuth 1 token request; its form-encoded (or JSON) answer. FlowFailed
    for a refusal or no answer (never the answer's text)."""
    request = httpx.Request("POST", url, data=dict(params) or None,
                            headers={"Accept": "application/x-www-form-urlencoded"})
    signer.sign_request(request)
    failed = FlowFailed(f"{spec.display_name} did not issue {what}. Start again.",
                        integration=spec.name, status_code=502)
    try:
        async with httpx.AsyncClient(
            transport=Borrowed(transport or broker.token_transport),
            timeout=spec.timeout_seconds, follow_redirects=False,
        ) as http:
            response = await http.send(request)
    except httpx.HTTPError:
        raise failed from None
    if response.status_code in (400, 401, 403):
        failed.status_code = 400
    if not response.is_success or len(response.content) > MAX_ANSWER_BYTES:
        raise failed
    text = response.text
    if response.headers.get("content-type", "").startswith("application/json"):
        try:
            data = json.loads(text)
        except ValueError:
            raise failed from None
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    return dict(parse_qsl(text, keep_blank_values=True))


KIND = OAuth1Kind()
