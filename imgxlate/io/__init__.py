"""Bytes and storage: read -> decode -> encode -> write. Nothing in this package imports torch."""
