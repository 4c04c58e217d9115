"""``python -m edge_safe.eval [OPTIONS]`` is ``edge-safe eval [OPTIONS]``."""
import sys

from edge_safe.cli import cli

if __name__ == "__main__":
    cli(["eval", *sys.argv[1:]], prog_name="edge-safe")
