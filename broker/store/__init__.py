"""Persistence: tables (``models``), migrations, ``database`` (engine, sessions, Alembic)
and ``repository`` (the one place that encrypts and decrypts)."""
