"""Study expansion, validation and launchers (``train`` is imported lazily)."""
