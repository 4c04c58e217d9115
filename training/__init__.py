"""Training of token banks (MOSAIC control tokens + mode co-training). Needs the `[train]` extra."""
