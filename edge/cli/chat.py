"""`edge-safe chat` and `edge-safe tokens`.

Results go to stdout, everything else (banner, notices, errors) to stderr.
:class:`EdgeSafeError` is converted to a click error by the group in cli.py.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import click

from edge_safe.convert.errors import EdgeSafeError
from edge_safe.sampling import CHAT_MIN_P, CHAT_REPEAT_PENALTY, CHAT_TOP_K

REPL_HELP = """\
Commands:
  /tokens NAMES   switch constraints (names or profiles, comma-separated; 'none' for none)
  /tokens         show the active constraints and what exists
  /mode NAME      switch the mode ('default' to go back to the default)
  /mode           show the mode
  /strictness X   refuse more (X > 0) or less (X < 0) than the bank as trained; 0 to reset
  /reset          forget the conversation
  /help           this help
  /exit           leave (or Ctrl-D); Ctrl-C stops the current reply"""


def load_edge_safe(**kwargs):
    """Build the runtime (a seam the CLI tests replace with a shared instance)."""
    from edge_safe.runtime import EdgeSafe

    return EdgeSafe(**kwargs)


def stdin_is_tty() -> bool:
    return sys.stdin.isatty()


@click.command()
@click.argument("prompt", required=False)
@click.option("-t", "--tokens", default=None, metavar="NAMES",
              help="Constraints to switch on: token or profile names, comma-separated (see `edge-safe tokens`).")
@click.option("--mode", default=None, metavar="NAME",
              help="Mode token, e.g. rejective [default: positive when constraints are on, else none].")
@click.option("-m", "--model", default=None, metavar="PATH",
              help="Base model GGUF [default: $EDGE_SAFE_MODEL, else the bundled Gemma 3 270M Q4_K_M].")
@click.option("-b", "--bank", default=None, metavar="PATH",
              help="Token bank GGUF [default: $EDGE_SAFE_BANK, else the bundled bank].")
@click.option("--system", default=None, metavar="TEXT", help="System text placed before the conversation.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Most tokens per reply.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Sampling temperature; 0 is greedy and deterministic.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True),
              help="Nucleus sampling mass (with --temperature > 0).")
@click.option("--top-k", default=CHAT_TOP_K, show_default=True, type=click.IntRange(min=0),
              help="Sample among the k most likely tokens only (0: all; with --temperature > 0).")
@click.option("--min-p", default=CHAT_MIN_P, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Drop tokens less likely than this fraction of the most likely one (with --temperature > 0).")
@click.option("--repeat-penalty", default=CHAT_REPEAT_PENALTY, show_default=True,
              type=click.FloatRange(min=0.0, min_open=True),
              help="Penalise tokens the reply already used (its last 64), greedy or not; 1 turns it off. The "
                   "default stops the bundled model from repeating a sentence; the refuse/answer decision "
                   "does not depend on it.")
@click.option("--seed", default=None, type=int, help="Random seed for sampling.")
@click.option("--strictness", default=0.0, show_default=True, type=float, metavar="LOGITS",
              help="Refuse more (> 0) or less (< 0) than the bank as trained: added to the refusal opener's "
                   "logit until the first visible reply token (with constraints on; see `edge-safe eval "
                   "--strictness`).")
@click.option("--n-ctx", default=8192, show_default=True, type=click.IntRange(min=16),
              help="Context length per sequence (positions; 18 KiB of KV cache each on the 270M model).")
@click.option("--n-gpu-layers", default=0, show_default=True, type=int,
              help="Layers to offload to the GPU (-1: all); needs a Metal or CUDA build of llama-cpp-python.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads [default: half the cores].")
@click.option("--reread/--no-reread", default=True, show_default=True,
              help="After earlier turns, also read the last user message alone under the same constraints (after "
                   "pasted text, its last line) and refuse when either view refuses (that text is prefilled twice).")
@click.option("--readout/--no-readout", default=True, show_default=True,
              help="Decide refusals by the bank's decision readout where it has one; --no-readout: by the "
                   "refusal-opener margin (EdgeSafe(readout=...)).")
@click.option("--json", "as_json", is_flag=True, help="Print the OpenAI-shaped response as JSON (one-shot only).")
def chat(prompt, tokens, mode, model, bank, system, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty,
         seed, strictness, n_ctx, n_gpu_layers, threads, reread, readout, as_json):
    """Chat with the model, with control tokens switched on per request.

    With PROMPT (or text piped on stdin) it answers once and exits; with
    neither, on a terminal, it opens an interactive chat (/help inside).

    \b
    Examples:
      edge-safe chat --tokens minors,eu "How do I mix a mojito?"
      echo "What is the capital of Peru?" | edge-safe chat
      edge-safe chat --tokens kiosk --mode rejective "Should I buy bitcoin?"
      edge-safe chat --tokens minors
    """
    from edge_safe.sampling import check_strictness

    check_strictness(strictness)  # before the model loads
    if prompt is None and not stdin_is_tty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise click.UsageError("no prompt: pass PROMPT or pipe text on stdin")
    es = load_edge_safe(model_path=model, bank=bank, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                        n_threads=threads, seed=seed, reread=reread, readout=readout,
                        ready_next_turn=prompt is None)  # while the user types
    session = Session(es, tokens=tokens, mode=mode, system=system)
    session.check()
    gen = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
               repeat_penalty=repeat_penalty, strictness=strictness)
    if prompt is not None:
        one_shot(session, prompt, gen, as_json)
    else:
        if as_json:
            raise click.UsageError("--json needs a PROMPT (or piped stdin)")
        Repl(session, gen).run()


@dataclass
class Session:
    """The conversation and the active composition, shared by one-shot and REPL."""

    es: object
    tokens: str | list[str] | None = None
    mode: str | None = None
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def check(self) -> tuple[list[str], str | None]:
        return self.es.compose(self.tokens, self.mode)

    def messages(self, text: str) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history + [{"role": "user", "content": text}]

    def describe(self) -> str:
        constraints, mode = self.check()
        return f"tokens: {', '.join(constraints) or '(none)'}; mode: {mode or '(none)'}"


def one_shot(session: Session, prompt: str, gen: dict, as_json: bool) -> None:
    messages = session.messages(prompt)
    if as_json:
        reply = session.es.create_chat_completion(messages, tokens=session.tokens, mode=session.mode, **gen)
        click.echo(json.dumps(reply, indent=2, ensure_ascii=False))
        return
    stream = session.es.create_chat_completion(messages, tokens=session.tokens, mode=session.mode, stream=True, **gen)
    for chunk in stream:
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    click.echo()


class Repl:
    """The interactive chat: streamed replies, multi-turn history, slash commands."""

    def __init__(self, session: Session, gen: dict):
        self.s, self.gen = session, gen

    def run(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and in-session history for input())
        except ImportError:  # pragma: no cover - Windows
            pass
        info(f"edge-safe chat ({self.s.describe()}). /help for commands, Ctrl-D to exit.")
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                click.echo(err=True)
                return
            except KeyboardInterrupt:
                click.echo(err=True)
                continue
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "exit":
                    return
                continue
            self.reply(line)

    def reply(self, text: str) -> None:
        messages = self.s.messages(text)
        parts: list[str] = []
        stream = None
        try:
            stream = self.s.es.create_chat_completion(messages, tokens=self.s.tokens, mode=self.s.mode, stream=True, **self.gen)
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    parts.append(piece)
                    click.echo(piece, nl=False)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo()
            info("[stopped; this turn is not kept in the conversation]")
            return
        except EdgeSafeError as e:
            if parts:
                click.echo()
            info(f"error: {e}")
            return
        finally:
            if stream is not None:
                stream.close()
        click.echo()
        self.s.history += [messages[-1], {"role": "assistant", "content": "".join(parts)}]

    def command(self, line: str) -> str | None:
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit"):
            return "exit"
        if cmd == "/help":
            info(REPL_HELP)
        elif cmd == "/reset":
            self.s.history.clear()
            info("conversation cleared")
        elif cmd == "/tokens":
            self.set_and_show("tokens", (None if arg.lower() == "none" else arg) if arg else self.s.tokens)
            if not arg:
                info(f"available: {', '.join(self.s.es.tokens)}; profiles: {', '.join(self.s.es.profiles)}")
        elif cmd == "/mode":
            self.set_and_show("mode", (None if arg.lower() == "default" else arg) if arg else self.s.mode)
            if not arg:
                info(f"available: {', '.join(self.s.es.modes) or '(none)'}")
        elif cmd == "/strictness":
            from edge_safe.sampling import check_strictness

            try:
                if arg:
                    self.gen["strictness"] = check_strictness(arg)
                info(f"strictness: {self.gen.get('strictness', 0.0):g}")
            except EdgeSafeError as e:
                info(f"error: {e}")
        else:
            info(f"unknown command {cmd!r}; /help lists the commands")
        return None

    def set_and_show(self, attr: str, value) -> None:
        old = getattr(self.s, attr)
        setattr(self.s, attr, value)
        try:
            info(self.s.describe())
        except EdgeSafeError as e:
            setattr(self.s, attr, old)
            info(f"error: {e}")


def info(text: str) -> None:
    click.echo(text, err=True)


@click.command()
@click.option("-b", "--bank", default=None, metavar="PATH",
              help="Token bank GGUF [default: $EDGE_SAFE_BANK, else the bundled bank].")
@click.option("--json", "as_json", is_flag=True, help="Print tokens, modes and profiles as JSON.")
def tokens(bank, as_json):
    """List the bank's control tokens, modes and profiles.

    \b
    Examples:
      edge-safe tokens
      edge-safe tokens --bank my-bank.gguf --json
    """
    from edge_safe.convert.bank import TokenBank
    from edge_safe.models import resolve_bank_path

    path = resolve_bank_path(bank)
    b = TokenBank.load(path)
    if as_json:
        data = {
            "bank": str(path),
            "tokens": {n: {"kind": b.tokens[n].kind, "description": b.tokens[n].description,
                           "n_vectors": b.tokens[n].n_vectors,
                           **({"depth": "deep"} if b.tokens[n].is_deep else {})} for n in b.tokens},
            "profiles": {k: list(v) for k, v in b.profiles.items()},
        }
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    click.echo(f"Bank: {path} ({b.name})")
    width = max([len(n) for n in list(b.tokens) + list(b.profiles)] + [4])
    sections = [
        ("Constraint tokens (--tokens NAME,...)", [(n, b.tokens[n].description) for n in b.constraints]),
        ("Profiles (--tokens NAME,...)", [(p, ", ".join(v)) for p, v in b.profiles.items()]),
        ("Modes (--mode NAME)", [(n, b.tokens[n].description) for n in b.modes]),
    ]
    for title, rows in sections:
        click.echo(f"\n{title}:")
        for name, text in rows or [("(none)", "")]:
            click.echo(f"  {name:<{width}}  {text}".rstrip())
