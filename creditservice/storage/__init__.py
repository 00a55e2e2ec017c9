"""Authority storage: the `Store` interface and its SQLite and PostgreSQL backends.

`open_store(url)` picks the backend from the URL scheme and creates the schema when missing.
"""

from __future__ import annotations

from creditservice.storage.base import Store, open_store

__all__ = ["Store", "open_store"]
