"""broker: credentials for workflow nodes — API keys and OAuth2 tokens, encrypted and fresh.

Plugins import from ``broker.integrations`` and ``broker.nodes`` (the seed's API); a host
process opens a ``Broker`` and serves ``broker.web.create_app(broker)``.
"""

from .config import Settings, load_settings
from .errors import (
    BrokerError,
    ConfigError,
    CredentialCorrupt,
    EncryptionKeyError,
    HTTPError,
    IntegrationNotConnected,
    PluginError,
)
from .runtime import Broker

__all__ = [
    "Broker",
    "BrokerError",
    "ConfigError",
    "CredentialCorrupt",
    "EncryptionKeyError",
    "HTTPError",
    "IntegrationNotConnected",
    "PluginError",
    "Settings",
    "load_settings",
]

__version__ = "0.1.0"
