"""Evaluation protocols on frozen backbones (never imports methods)."""
