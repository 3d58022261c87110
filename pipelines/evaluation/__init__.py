"""Evaluation of anomaly detectors: NAB scoring and event-level metrics."""
