"""Fixtures of the admission tests."""

from __future__ import annotations
