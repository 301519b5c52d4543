"""Evaluation: metrics, FID, scoring, the evaluation runner, reports, guided evaluation."""
