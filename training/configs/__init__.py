"""Training configs (YAML)."""
