"""What do control tokens cost at inference, per composition, against bare llama-cpp-python,
the rules as text and a two-call guard? A thin entry for `edge-safe bench` (the measuring code
lives in the installed package: edge_safe.benchmark); every option of the command works here.

    python bench/bench_runtime.py --quick
    python bench/bench_runtime.py --threads 2 --out bench        # the committed run (bench/RESULTS.md)
    python bench/bench_runtime.py -c minors,eu -c none --repeats 20
"""
import sys

from edge_safe.cli import cli

if __name__ == "__main__":
    cli(["bench", *sys.argv[1:]], prog_name="edge-safe")
