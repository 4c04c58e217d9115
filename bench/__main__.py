"""``python -m edge_safe.bench [OPTIONS]`` is ``edge-safe bench [OPTIONS]``."""
import sys

from edge_safe.cli import cli

if __name__ == "__main__":
    cli(["bench", *sys.argv[1:]], prog_name="edge-safe")
