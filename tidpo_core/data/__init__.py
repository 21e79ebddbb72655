"""Preference data: formats, sources, quarantine reasons and the built-in synthetic corpus."""
