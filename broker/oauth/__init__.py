"""OAuth2: authorization-code flows with PKCE, client credentials, token handling.

The protocol itself (authorization URL, PKCE challenge, token requests, client
authentication) is Authlib's; this package holds the broker's decisions around it (pure
functions in ``tokens`` and ``decisions``) and the thin I/O that calls Authlib (``client``).
"""
