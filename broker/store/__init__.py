"""Persistence: tables, migrations, and the repository that encrypts and decrypts."""

from .database import Database
from .repository import Repository

__all__ = ["Database", "Repository"]
