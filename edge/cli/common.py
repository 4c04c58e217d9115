"""What several `edge-safe` commands share: groups that also run, the command line as typed, the torch check.

Imports nothing heavy: every command module imports it at `--help` time.
"""
from __future__ import annotations

import shlex

import click
from click.core import ParameterSource

TORCH_MISSING = "this command needs torch and transformers: pip install torch==2.13.0 && pip install 'edge-safe[train]'"


class RunOrGroup(click.Group):
    """A command that runs itself without a subcommand and also groups side commands.

    ``edge-safe eval [OPTIONS]`` runs the evaluation, ``edge-safe eval compare ...`` a side
    command. The group's own options belong to its own run: given together with a
    subcommand they are a usage error (:func:`own_options_only`).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("invoke_without_command", True)
        kwargs.setdefault("subcommand_metavar", "[COMMAND [ARGS]...]")
        super().__init__(*args, **kwargs)


def own_options_only(ctx: click.Context) -> bool:
    """True when ``ctx``'s group runs itself; False, after checking that none of its options were given,
    when a subcommand runs instead."""
    if ctx.invoked_subcommand is None:
        return True
    given = [max(p.opts, key=len) for p in ctx.command.params
             if ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
    if given:
        verb, them = ("belongs", "it") if len(given) == 1 else ("belong", "them")
        raise click.UsageError(
            f"{', '.join(given)} {verb} to `{ctx.command_path}` itself, not to its `{ctx.invoked_subcommand}` "
            f"command; pass {them} after `{ctx.invoked_subcommand}` where that command has {them}", ctx)
    return False


def command_line(ctx: click.Context) -> str:
    """The command as typed: ``edge-safe``, the subcommand names, then the parameters given on the
    command line, in declaration order and a canonical spelling (for the reports' "made with")."""
    names, c = [], ctx
    while c.parent is not None:
        names.append(c.info_name)
        c = c.parent
    parts = ["edge-safe", *reversed(names)]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        values = list(value) if param.multiple or param.nargs != 1 else [value]
        if isinstance(param, click.Argument):
            parts += [shlex.quote(str(v)) for v in values]
            continue
        flag = max(param.opts, key=len)
        if param.is_flag and param.secondary_opts:  # --rss/--no-rss
            parts.append(flag if value else max(param.secondary_opts, key=len))
        elif param.is_flag:
            parts.append(flag)
        else:
            parts += [x for v in values for x in (flag, shlex.quote(str(v)))]
    return " ".join(parts)


def need_torch() -> None:
    """A one-line error, not an ImportError traceback, where the [train] extra is missing."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise click.ClickException(TORCH_MISSING) from None
