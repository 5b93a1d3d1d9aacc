"""Evaluations: judge outputs against ground truth that no stage reads."""
