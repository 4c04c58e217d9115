"""Training/evaluation data written and generated in this repo (see README.md here)."""
