"""Fixtures of the gateway tests."""

from __future__ import annotations
