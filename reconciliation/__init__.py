"""Reconciliation with the carriers' daily settlement reports (formats, comparison, the
report operators read, and the daily schedule)."""
