"""Fixtures of the authority tests."""

from __future__ import annotations
