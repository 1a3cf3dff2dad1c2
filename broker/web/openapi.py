"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

Written by hand next to the routes (they are few), with the provider-specific request
bodies left open: what a trigger route accepts depends on the integration's fields.
"""

from __future__ import annotations

from typing import Any

from ..auth import kinds

__all__ = ["openapi"]

GROUP = {
    "name": "group_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"},
}
NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_-]{0,63}$"},
}
ERROR = {
    "description": "Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
PAGE = {
    "description": "Result page (HTML)",
    "content": {"text/html": {"schema": {"type": "string"}}},
}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): ERROR for code in codes}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _redeem(field: str, summary: str, errors: dict[str, Any]) -> dict[str, Any]:
    """A POST a broker page makes from its own origin with one string ``field``, answered
    with ``{"location"}`` (where the page goes next)."""
    return {
        "summary": summary,
        "security": [],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {
                "type": "object", "required": [field],
                "properties": {field: {"type": "string"}},
            }}},
        },
        "responses": {
            "200": _json({"type": "object", "properties": {"location": {"type": "string"}}}),
            **errors,
        },
    }


def openapi(public_url: str) -> dict[str, Any]:
    service: list[dict[str, list[str]]] = [{"serviceToken": []}]
    either: list[dict[str, list[str]]] = [{"serviceToken": []}, {"connectSession": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "broker",
            "version": "0.1.0",
            "description": "Credentials for workflow nodes: API keys and OAuth2 tokens.",
        },
        "servers": [{"url": public_url}],
        "components": {
            "securitySchemes": {
                "serviceToken": {"type": "http", "scheme": "bearer"},
                "connectSession": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                                "field": {"type": "string"},
                            },
                        }
                    },
                },
                "Integration": {
                    "type": "object",
                    "required": ["name", "display_name", "auth_type", "config", "status"],
                    "properties": {
                        "name": {"type": "string"},
                        "display_name": {"type": "string"},
                        "image": {"type": "string"},
                        "auth_type": {"enum": sorted(kinds())},
                        "auth_title": {"type": "string"},
                        "connect": {"enum": ["form", "popup"]},
                        "status": {"type": "string"},
                        "config": {"type": "object"},
                        "fields": {"type": "object"},
                        "settings": {"type": "object"},
                        "hint": {"type": "object"},
                        "needed_by": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {"200": _json({"type": "object"})},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: the database answers and its schema is current",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}),
                                  "503": _json({"type": "object"})},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (metrics.enabled; metrics.token or "
                               "metrics.allow)",
                    "security": [],
                    "responses": {"200": {"description": "text/plain exposition"},
                                  "403": {"description": "not allowed to scrape"},
                                  "404": {"description": "metrics are off"}},
                }
            },
            "/connect-sessions": {
                "post": {
                    "summary": "Open a connect session for one group",
                    "security": service,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["group_id"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "group_id": GROUP["schema"],
                                        "integrations": {
                                            "type": "array",
                                            "items": {"type": "string"},
                                        },
                                        "display_name": {
                                            "type": "string",
                                            "minLength": 1,
                                            "maxLength": 100,
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "201": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "token": {"type": "string"},
                                    "expires_at": {"type": "string"},
                                    "connect_url": {"type": "string"},
                                },
                            },
                            "Created",
                        ),
                        **_errors(401, 403, 413, 422),
                    },
                }
            },
            "/groups/{group_id}/integrations": {
                "get": {
                    "summary": "Every enabled integration and its status for the group",
                    "security": either,
                    "parameters": [GROUP],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "group_id": {"type": "string"},
                                    "integrations": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Integration"},
                                    },
                                },
                            }
                        ),
                        **_errors(401, 404, 422),
                    },
                }
            },
            "/groups/{group_id}/integrations/custom/{name}": {
                "post": {
                    "summary": "Connect: store the submitted credential (the seed's trigger)",
                    "security": either,
                    "parameters": [GROUP, NAME],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json({"type": "object"}),
                        **_errors(401, 404, 413, 422, 502),
                    },
                }
            },
            "/groups/{group_id}/integrations/custom/{name}/disconnect": {
                "post": {
                    "summary": "Disconnect (the seed's delete); idempotent",
                    "security": either,
                    "parameters": [GROUP, NAME],
                    "responses": {"200": _json({"type": "object"}), **_errors(401, 404, 422)},
                }
            },
            "/groups/{group_id}/integrations/{name}/authorize": {
                "post": {
                    "summary": "A single-use ticket to start an OAuth2 sign-in in a popup",
                    "security": either,
                    "parameters": [GROUP, NAME],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "settings": {
                                            "type": "object",
                                            "additionalProperties": {"type": "string"},
                                        },
                                        "return_to": {"type": "string", "maxLength": 512},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "201": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "ticket": {"type": "string"},
                                    "expires_at": {"type": "string"},
                                    "start_url": {"type": "string"},
                                },
                            },
                            "Created",
                        ),
                        **_errors(401, 404, 413, 422),
                    },
                },
                "get": {
                    "summary": "Refused: a sign-in cannot start from a link (result page)",
                    "security": [],
                    "parameters": [GROUP, NAME],
                    "responses": {"400": PAGE, "401": PAGE},
                },
            },
            "/connect-sessions/current": {
                "get": {
                    "summary": "The calling connect session: group, workspace name, expiry",
                    "security": [{"connectSession": []}],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "group_id": {"type": "string"},
                                    "display_name": {"type": ["string", "null"]},
                                    "integrations": {
                                        "type": ["array", "null"],
                                        "items": {"type": "string"},
                                    },
                                    "expires_at": {"type": "string"},
                                },
                            }
                        ),
                        **_errors(401, 403),
                    },
                }
            },
            "/oauth/start": {
                "get": {
                    "summary": "The sign-in popup's start page (asks its opener for a ticket)",
                    "security": [],
                    "responses": {"200": PAGE},
                },
                "post": _redeem(
                    "ticket", "Redeem a ticket from the broker's own page: the provider URL",
                    _errors(400, 401, 403, 413, 422, 500),
                ),
            },
            "/admin": {
                "get": {
                    "summary": "The operator page (with the cookie `broker admin-link` opens)",
                    "security": [],
                    "responses": {"200": PAGE, "401": PAGE},
                },
            },
            "/admin/enter": {
                "get": {
                    "summary": "The page a `broker admin-link` URL opens",
                    "security": [],
                    "responses": {"200": PAGE},
                },
                "post": _redeem(
                    "token", "Redeem a one-time operator link from the broker's own page",
                    _errors(400, 403, 413, 422, 500),
                ),
            },
            "/groups/{group_id}/integrations/{name}/credentials": {
                "get": {
                    "summary": "The credential for a node, with a token valid right now",
                    "security": service,
                    "parameters": [
                        GROUP,
                        NAME,
                        {
                            "name": "force_refresh",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "boolean"},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {"type": "object", "properties": {"credentials": {"type": "object"}}}
                        ),
                        **_errors(401, 403, 404, 409, 422, 500, 503),
                    },
                }
            },
            "/groups/{group_id}/integrations/{name}/proxy/{path}": {
                method: {
                    "summary": "The provider's API, with the connection's credential applied "
                    "by the broker (any method; the answer is the provider's, streamed)",
                    "security": service,
                    "parameters": [
                        GROUP,
                        NAME,
                        {"name": "path", "in": "path", "required": True,
                         "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "default": {"description": "The provider's answer, as it came"},
                        **_errors(401, 403, 404, 409, 413, 422, 502, 504),
                    },
                }
                for method in ("get", "post", "put", "patch", "delete")
            },
            "/groups/{group_id}/events": {
                "get": {
                    "summary": "The group's connection events, newest first",
                    "security": service,
                    "parameters": [
                        GROUP,
                        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                        {"name": "before", "in": "query", "schema": {"type": "integer"}},
                    ],
                    "responses": {"200": _json({"type": "object"}), **_errors(401, 403, 422)},
                }
            },
            "/oauth/callback": {
                "get": {
                    "summary": "The OAuth2 redirect URI (renders the result page)",
                    "security": [],
                    "responses": {
                        "200": PAGE,
                        "400": PAGE,
                        "401": PAGE,
                        "500": PAGE,
                        "502": PAGE,
                        "503": PAGE,
                    },
                }
            },
        },
    }
