"""Run directories -> pandas DataFrame -> tables and figures (no torch here)."""
