"""Package data: the default token bank shipped with edge-safe."""
