"""Cohort ingestion, NIfTI validation and preprocessing."""
