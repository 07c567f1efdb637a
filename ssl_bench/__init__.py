"""ssl-bench: a reproducible benchmark harness for DINO variants."""

__version__ = "0.1.0"
