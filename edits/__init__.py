"""Edits: change the weights to remove what localization found (one module per method)."""
