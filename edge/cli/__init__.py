"""The `edge-safe` command line.

Subcommands live in their own modules and are imported only when used, so
`edge-safe --help` is instant and never loads llama.cpp or torch. Every entry point
is a subcommand here (no `python -m` scripts elsewhere).

Errors, one convention for every command, at this boundary: one line on stderr,
``Error: ...``; exit 2 for usage errors (bad option values, missing files given as
arguments: click's UsageError / BadParameter), exit 1 for failures (ClickException,
and :class:`EdgeSafeError` or OSError converted here). No tracebacks.
"""
from __future__ import annotations

import importlib
import logging
import os

import click
from click.exceptions import NoArgsIsHelpError

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
    "train": "edge_safe.cli.train:train",
    "data": "edge_safe.cli.data:data",
    "eval": "edge_safe.cli.eval:eval_cmd",
    "bench": "edge_safe.cli.bench:bench",
    "serve": "edge_safe.cli.serve:serve",
}


class OneLineUsageError(click.UsageError):
    """A usage error shown as one line (click's own adds the usage and a hint line), still exit 2."""

    def show(self, file=None) -> None:
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"Error: {self.format_message()}{hint}", file=file, err=file is None)


def _one_line(e: click.UsageError) -> click.UsageError:
    if isinstance(e, (OneLineUsageError, NoArgsIsHelpError)):  # the latter shows the help: leave it
        return e
    return OneLineUsageError(e.format_message(), e.ctx)


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use; the error boundary of the whole CLI."""

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

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:  # e.g. an unknown option of the root command
            raise _one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # any subcommand's, raised while parsing or running
            raise _one_line(e) from None
        except EdgeSafeError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # a file that cannot be read or written: the system's message says which
            raise click.ClickException(str(e)) from None


@click.group(
    "edge-safe",
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
      edge-safe eval --limit 8 --out /tmp/eval-quick
      edge-safe train validate bank.gguf
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    if cpu_repack:  # through the environment: eval's runtimes, bench's baselines and its child processes alike
        os.environ[ENV_CPU_REPACK] = cpu_repack.lower()


def main() -> None:
    cli(prog_name="edge-safe")
