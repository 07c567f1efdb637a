"""Benchmarks that print figures (speed, memory); never imported by the training path."""
