"""Metrics and statistics (no plotting here)."""
