"""``python -m edge_safe.cli`` is the ``edge-safe`` command."""
from edge_safe.cli import main

main()
