"""The `edge-safe` command line.

Subcommands live in their own modules and are imported only when used, so
`edge-safe --help` is instant and never loads llama.cpp or torch. Domain errors
(:class:`EdgeSafeError`) become one-line click errors here, at the boundary.
"""
from __future__ import annotations

import importlib
import logging
import os

import click

from edge_safe import __version__
from edge_safe.convert.errors import EdgeSafeError

# Kept here (not imported from edge_safe.llama) so `edge-safe --help` never loads llama.cpp.
ENV_CPU_REPACK = "EDGE_SAFE_CPU_REPACK"
CPU_REPACK_CHOICES = ("auto", "on", "off")

# name -> "module:attribute"; one line per subcommand.
COMMANDS = {
    "chat": "edge_safe.cli.chat:chat",
    "tokens": "edge_safe.cli.chat:tokens",
    "convert": "edge_safe.cli.convert:convert",
    "train": "edge_safe.training.cli:train",
    "eval": "edge_safe.cli.eval:eval_cmd",
    "bench": "edge_safe.cli.bench:bench",
    "serve": "edge_safe.cli.serve:serve",
    "data": "edge_safe.training.data.cli:data",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeSafeError as e:
            raise click.ClickException(str(e)) from None


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="edge-safe")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("--cpu-repack", type=click.Choice(CPU_REPACK_CHOICES, case_sensitive=False), default=None,
              envvar=ENV_CPU_REPACK, show_envvar=True,
              help="llama.cpp's repacked CPU weights for every model the command loads: auto (default) turns "
                   "them off only where llama.cpp is built with Intel AMX, whose repacked Q4_K kernels crash.")
def cli(verbose: int, cpu_repack: str | None) -> None:
    """Composable safety control tokens for on-device LLMs.

    \b
    Examples:
      edge-safe chat --tokens minors,eu "How do I mix a mojito?"
      edge-safe tokens
      edge-safe convert inspect bank.gguf
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    if cpu_repack:  # through the environment: eval's runtimes, bench's baselines and its child processes alike
        os.environ[ENV_CPU_REPACK] = cpu_repack.lower()


def main() -> None:
    cli(prog_name="edge-safe")


if __name__ == "__main__":
    main()
