"""Recorded workflow histories, replayed by tests/test_replay.py (see docs/versioning.md)."""
