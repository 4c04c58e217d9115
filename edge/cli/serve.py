"""`edge-safe serve`: the OpenAI-compatible server (edge_safe.server) under uvicorn.

Option help for the server settings comes from :class:`ServerSettings`, where
each description is written once.
"""
from __future__ import annotations

import logging

import click

from edge_safe.cli.chat import load_edge_safe

try:
    from edge_safe.server.schema import ServerSettings
except ImportError:  # pydantic comes with the [server] extra; `serve` says what to install when run
    ServerSettings = None

ENV_API_KEY = "EDGE_SAFE_API_KEY"
SERVER_EXTRA = "pip install 'edge-safe[server]'"


def _help(field: str) -> str:
    return ServerSettings.model_fields[field].description if ServerSettings else f"(needs {SERVER_EXTRA})"


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback exposes the server (set --api-key).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("-m", "--model", default=None, metavar="PATH",
              help="Base model GGUF [default: $EDGE_SAFE_MODEL, else the bundled Gemma 3 270M Q4_K_M].")
@click.option("-b", "--bank", default=None, metavar="PATH",
              help="Token bank GGUF [default: $EDGE_SAFE_BANK, else the bundled bank].")
@click.option("--api-key", envvar=ENV_API_KEY, default=None, metavar="KEY", help=_help("api_key"))
@click.option("-t", "--default-tokens", default=None, metavar="NAMES", help=_help("default_tokens"))
@click.option("--max-tokens-limit", default=None, type=click.IntRange(min=1), metavar="N",
              help=_help("max_tokens_limit"))
@click.option("--allow-negative-mode", is_flag=True, help=_help("allow_negative_mode"))
@click.option("--default-strictness", default=None, type=float, metavar="LOGITS", help=_help("default_strictness"))
@click.option("--max-body-bytes", default=None, type=click.IntRange(min=1024), metavar="N",
              help=_help("max_body_bytes"))
@click.option("--max-queue", default=None, type=click.IntRange(min=1), metavar="N", help=_help("max_queue"))
@click.option("--parallel", default=4, show_default=True, type=click.IntRange(min=1, max=64), metavar="N",
              help="Requests decoded together, each in its own sequence with its own composition (1: one at a time).")
@click.option("--repeat-penalty", default=None, type=click.FloatRange(min=0.0, min_open=True), metavar="X",
              help=_help("repeat_penalty"))
@click.option("--top-k", default=None, type=click.IntRange(min=0), metavar="K", help=_help("top_k"))
@click.option("--min-p", default=None, type=click.FloatRange(0.0, 1.0), metavar="P", help=_help("min_p"))
@click.option("--model-id", default=None, metavar="ID", help=_help("model_id"))
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
def serve(host, port, model, bank, api_key, default_tokens, max_tokens_limit, allow_negative_mode,
          default_strictness, max_body_bytes, max_queue, parallel, repeat_penalty, top_k, min_p, model_id, n_ctx,
          n_gpu_layers, threads, reread, readout):
    """Serve an OpenAI-compatible API with control tokens chosen per request.

    Requests pick constraints with the extra body fields `tokens` and `mode`
    (openai client: extra_body={"tokens": "minors,eu"}).

    \b
    Examples:
      edge-safe serve
      edge-safe serve --port 8000 --default-tokens minors --api-key s3cret
      edge-safe serve --parallel 8            # 8 requests decoded together
      curl localhost:8080/v1/chat/completions -d '{"messages": [{"role": "user",
        "content": "How do I mix a mojito?"}], "tokens": "minors,eu"}'
    """
    try:
        import uvicorn

        from edge_safe.server import create_app
    except ImportError as e:
        raise click.ClickException(f"the server needs FastAPI and uvicorn ({e}); {SERVER_EXTRA}") from None
    given = dict(api_key=api_key or None, default_tokens=default_tokens, max_tokens_limit=max_tokens_limit,
                 allow_negative_mode=allow_negative_mode, default_strictness=default_strictness,
                 max_body_bytes=max_body_bytes, max_queue=max_queue, repeat_penalty=repeat_penalty, top_k=top_k,
                 min_p=min_p, model_id=model_id)
    from pydantic import ValidationError

    try:
        settings = ServerSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        raise click.BadParameter(err["msg"], param_hint="--" + str(err["loc"][0]).replace("_", "-")) from None
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"edge-safe: warning: serving on {host} without an API key (--api-key or ${ENV_API_KEY})",
                   err=True)
    es = load_edge_safe(model_path=model, bank=bank, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=threads,
                        n_parallel=parallel, reread=reread, readout=readout,
                        ready_next_turn=True)  # a chat client's next turn, laid out while idle
    with es:
        app = create_app(es, settings)
        state = app.state.edge_safe
        click.echo(
            f"edge-safe: serving {state.model_id} on http://{host}:{port}/v1 "
            f"(tokens: {', '.join(es.tokens)}; profiles: {', '.join(es.profiles) or '(none)'}; "
            f"modes: {', '.join(es.modes) or '(none)'}; default tokens: {', '.join(state.default_tokens) or '(none)'}; "
            f"parallel: {es.n_parallel})",
            err=True,
        )
        uvicorn.run(app, host=host, port=port, log_level=_uvicorn_level(), timeout_graceful_shutdown=5)


def _uvicorn_level() -> str:
    level = logging.getLogger().getEffectiveLevel()
    return "debug" if level <= logging.DEBUG else "info"
