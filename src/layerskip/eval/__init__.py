"""Evaluation: datasets in the reference tool's prompt formats, quality metrics, and correctness checks."""
