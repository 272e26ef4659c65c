"""Helpers for testing pysparsecl and code built on it."""
