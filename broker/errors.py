"""The broker's exceptions: one tree, one base.

    BrokerError
    ├── ConfigError                  config.yaml is wrong; raised before anything starts
    ├── EncryptionKeyError           missing, malformed or wrong encryption key
    ├── SchemaOutOfDate              migrations are pending (run `broker db upgrade`)
    ├── PluginError                  a plugin cannot be loaded or registers a clash
    ├── TokenEndpointError           a token request failed (status, RFC error, outcome)
    └── HTTPError                    anything a route turns into a JSON error response
        ├── Unauthorized             401 unauthorized
        ├── Forbidden                403 forbidden
        ├── NotFound                 404 not_found
        │   ├── UnknownIntegration   404 unknown_integration
        │   ├── ApiNotDescribed      404 api_not_described (no ``api`` section to call)
        │   └── IntegrationNotConnected   404 integration_not_connected
        ├── IntegrationNeedsReauth   409 integration_needs_reauth
        ├── IntegrationUnavailable   503 integration_unavailable
        ├── PayloadTooLarge          413 payload_too_large
        ├── InvalidInput             422 invalid_input (names the field at fault)
        ├── CredentialRejected       422 credential_rejected (the provider said no)
        ├── ProviderUnreachable      502 provider_unreachable
        ├── ProviderTimeout          504 provider_timeout
        ├── ServiceUnavailable       503 service_unavailable
        └── CredentialCorrupt        500 credential_corrupt (a ciphertext that does not open
                                     for its row; names the connection, never the secret)

HTTP status and the stable error ``code`` are class attributes, never a switch.
Messages never carry a secret: they are shown to users and written to logs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

__all__ = [
    "ApiNotDescribed",
    "BrokerError",
    "ConfigError",
    "CredentialCorrupt",
    "CredentialRejected",
    "EncryptionKeyError",
    "Forbidden",
    "HTTPError",
    "IntegrationNeedsReauth",
    "IntegrationNotConnected",
    "IntegrationUnavailable",
    "InvalidInput",
    "NotFound",
    "PayloadTooLarge",
    "PluginError",
    "ProviderTimeout",
    "ProviderUnreachable",
    "SchemaOutOfDate",
    "ServiceUnavailable",
    "TokenEndpointError",
    "Unauthorized",
    "UnknownIntegration",
]


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""


class ConfigError(BrokerError):
    """config.yaml (or a provider file) is invalid.

    ``problems`` holds one line per problem: ``<file>: <key.path>: <what was expected>``.
    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class EncryptionKeyError(BrokerError):
    """The encryption keys cannot be used with the data that is stored."""


class TokenEndpointError(BrokerError):
    """A token request failed. ``outcome`` says what it means (see oauth.decisions).

    Carries the HTTP status, the RFC 6749 error code and Retry-After; never a body.
    """

    def __init__(
        self,
        message: str,
        *,
        error: str | None,
        status: int | None,
        retry_after: float | None,
        outcome: str,
    ) -> None:
        super().__init__(message)
        self.error = error
        self.status = status
        self.retry_after = retry_after
        self.outcome = outcome


class SchemaOutOfDate(BrokerError):
    """The database schema is behind the code: run ``broker db upgrade``."""


class PluginError(BrokerError):
    """A plugin could not be imported, or registered something invalid."""


class HTTPError(BrokerError):
    """An error with an HTTP status and a stable machine-readable ``code``."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return {"error": body}


class Unauthorized(HTTPError):
    status_code = 401
    code = "unauthorized"


class Forbidden(HTTPError):
    status_code = 403
    code = "forbidden"


class NotFound(HTTPError):
    status_code = 404
    code = "not_found"


class UnknownIntegration(NotFound):
    code = "unknown_integration"

    def __init__(self, name: str) -> None:
        super().__init__(f"No integration named {name!r} is enabled.", integration=name)


class ApiNotDescribed(NotFound):
    """The integration's provider has no ``api`` section: the broker cannot call it."""

    code = "api_not_described"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"The broker does not know the API of {name!r} (its provider has no api "
            "section): get its credential with custom_integration instead.",
            integration=name,
        )


class IntegrationNotConnected(NotFound):
    """Raised for a node, before ``call``, when integrations it needs are not connected."""

    code = "integration_not_connected"

    def __init__(self, missing: Iterable[str], group_id: str | None = None) -> None:
        self.missing = sorted(missing)
        names = ", ".join(self.missing)
        where = f" for group {group_id!r}" if group_id is not None else ""
        plural = "s are" if len(self.missing) > 1 else " is"
        super().__init__(
            f"Integration{plural} not connected{where}: {names}. Connect it and try again.",
            missing=self.missing,
        )


class IntegrationNeedsReauth(HTTPError):
    """The provider revoked the grant or it expired: the user must connect again."""

    status_code = 409
    code = "integration_needs_reauth"

    def __init__(self, name: str, display_name: str | None = None) -> None:
        super().__init__(
            f"{display_name or name} needs to be connected again: the provider no longer "
            "accepts the stored authorization. Reconnect it and try again.",
            integration=name,
        )


class IntegrationUnavailable(HTTPError):
    """No valid token can be had right now (the provider is failing); try later."""

    status_code = 503
    code = "integration_unavailable"

    def __init__(self, name: str, display_name: str | None = None) -> None:
        super().__init__(
            f"{display_name or name} is unavailable: its token expired and the provider "
            "could not issue a new one. Try again shortly.",
            integration=name,
        )


class PayloadTooLarge(HTTPError):
    status_code = 413
    code = "payload_too_large"


class InvalidInput(HTTPError):
    status_code = 422
    code = "invalid_input"


class CredentialRejected(HTTPError):
    """The provider refused the credential when the broker checked it."""

    status_code = 422
    code = "credential_rejected"


class ProviderUnreachable(HTTPError):
    status_code = 502
    code = "provider_unreachable"


class ProviderTimeout(HTTPError):
    status_code = 504
    code = "provider_timeout"


class ServiceUnavailable(HTTPError):
    status_code = 503
    code = "service_unavailable"


class CredentialCorrupt(HTTPError):
    """A stored credential does not decrypt, or was not written for this row.

    The message names the connection (group and integration), never its contents.
    """

    status_code = 500
    code = "credential_corrupt"


def error_class(code: str) -> type[HTTPError]:
    """The HTTPError subclass with this ``code`` (HTTPError itself when unknown)."""
    stack: list[type[HTTPError]] = [HTTPError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls
        stack.extend(cls.__subclasses__())
    return HTTPError
