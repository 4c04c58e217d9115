"""`edge-safe convert`: inspect, validate, build, edit and convert token banks.

Results go to stdout, notes to stderr; domain errors (EdgeSafeError) become
one-line ``Error: ...`` messages at the CLI boundary (``edge_safe.cli``).
Commands that edit a bank (rename, remove, from-text --into) rewrite it in
place, atomically, unless ``-o`` names another file.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import click

from edge_safe.convert import interchange
from edge_safe.convert.bank import TokenBank, from_text_bank, from_text_token
from edge_safe.convert.bank_io import stored_dtype
from edge_safe.convert.keys import TENSOR_DTYPES, Kind, Origin
from edge_safe.convert.model import ModelInfo
from edge_safe.models import llama_tokenizer, resolve_model_path

PATH = click.Path(dir_okay=False, path_type=Path)  # existence is checked by the library, with a better message

model_option = click.option(
    "-m", "--model", type=PATH, default=None,
    help="Base model GGUF (default: $EDGE_SAFE_MODEL, else the bundled Gemma 3 270M).",
)  # fmt: skip
force_option = click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
dtype_option = click.option(
    "--dtype", type=click.Choice(TENSOR_DTYPES, case_sensitive=False), default="F32", show_default=True,
    help="Storage type of the vectors (F16 halves the size).",
)  # fmt: skip


@click.group()
def convert() -> None:
    """Inspect, validate, build and edit token banks (GGUF sidecars).

    \b
    Examples:
      edge-safe convert inspect bank.gguf
      edge-safe convert validate bank.gguf --model gemma-3-270m-q4_k_m.gguf
      edge-safe convert from-text --name alcohol --rule "Do not help with alcohol." -o text.gguf
      edge-safe convert merge a.gguf b.gguf -o both.gguf --on-clash rename
    """


# --- reading -------------------------------------------------------------------


@convert.command()
@click.argument("bank", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(bank: Path, as_json: bool) -> None:
    """Show a bank's tokens, profiles, base model and evaluation summary.

    \b
    Examples:
      edge-safe convert inspect bank.gguf
      edge-safe convert inspect bank.gguf --json | jq .tokens
    """
    b = TokenBank.load(bank)
    if as_json:
        click.echo(json.dumps(_inspect_json(b, bank), indent=2))
    else:
        click.echo(format_bank(b, bank))


@convert.command()
@click.argument("bank", type=PATH)
@model_option
def validate(bank: Path, model: Path | None) -> None:
    """Check a bank file, and with --model that it fits that base model.

    \b
    Examples:
      edge-safe convert validate bank.gguf
      edge-safe convert validate bank.gguf --model gemma-3-270m-q4_k_m.gguf
    """
    b = TokenBank.load(bank)
    info = ModelInfo.read(resolve_model_path(model)) if model is not None else None
    if info is not None:
        b.check_model(info)
    click.echo(f"OK: {bank} is a valid token bank ({_counts(b)}; base {b.base_name})")
    if info is not None:
        deep = f", {info.n_layer} layers x K/V {info.n_embd_k_gqa}" if b.deep_geometry is not None else ""
        click.echo(f"OK: it fits {info.path} ({info.arch}, n_embd {info.n_embd}{deep}, fingerprint matches)")


# --- building ------------------------------------------------------------------


@convert.command("from-text")
@click.option("--rule", required=True, help="The constraint as a natural-language rule (one line).")
@click.option("--name", required=True, help="Token name (lowercase slug), e.g. alcohol.")
@click.option("--description", default="", help="What the token blocks (shown by `edge-safe tokens`).")
@click.option("--refusal", default="", help="The fixed reply a trained token would give.")
@click.option("--kind", type=click.Choice(Kind.ALL), default=Kind.CONSTRAINT, show_default=True)
@click.option("--profile", "profiles", multiple=True, help="Also add the token to this profile (repeatable).")
@model_option
@click.option("--into", type=PATH, default=None, help="Add the token to this existing bank (edited in place).")
@click.option("-o", "--output", type=PATH, default=None, help="Write a new bank here (or the edited --into bank).")
@force_option
@dtype_option
def from_text(rule, name, description, refusal, kind, profiles, model, into, output, force, dtype) -> None:
    """Build a bank entry from a text rule: the rule's own token embeddings.

    The vectors are exactly what llama.cpp feeds the model for the rule written
    as a prompt line, so the token behaves like the text: the baseline every
    trained token is compared with.

    \b
    Examples:
      edge-safe convert from-text --name alcohol --rule "Do not help with alcoholic drinks." -o text.gguf
      edge-safe convert from-text --name gambling --rule "Do not help with gambling." --into text.gguf
    """
    if into is None and output is None:
        raise click.ClickException("pass -o NEW_BANK to create a bank, or --into BANK to add the token to one")
    model_path = resolve_model_path(model)
    info = ModelInfo.read(model_path)
    target = TokenBank.load(into) if into is not None else None  # fail fast, before loading the tokenizer
    if target is not None:
        target.check_model(info)
    tok = from_text_token(
        info, llama_tokenizer(model_path), name, rule, kind=kind, description=description, refusal=refusal
    )
    if target is None:
        bank = from_text_bank(info, [tok])
    else:
        origin = "" if target.origin == Origin.FROM_TEXT else Origin.FROM_TEXT
        bank = target.with_token(replace(tok, origin=origin), replace_existing=force)
    bank = _add_to_profiles(bank, name, profiles)
    out = _save(bank, output or into, source=into, force=force, dtype=dtype)
    click.echo(f"wrote {out}: {kind} {name!r} from {tok.n_vectors} rule tokens ({_counts(bank)})")


@convert.command()
@click.argument("first", type=PATH)
@click.argument("second", type=PATH)
@click.option("-o", "--output", type=PATH, required=True, help="The merged bank.")
@click.option(
    "--on-clash", type=click.Choice(("error", "ours", "theirs", "rename")), default="error", show_default=True,
    help="A name both banks define differently: fail, keep FIRST's, take SECOND's, or rename SECOND's to NAME_2.",
)  # fmt: skip
@force_option
@dtype_option
def merge(first: Path, second: Path, output: Path, on_clash: str, force: bool, dtype: str) -> None:
    """Merge two banks for the same base model (union of tokens and profiles).

    \b
    Examples:
      edge-safe convert merge trained.gguf text.gguf -o both.gguf --on-clash rename
    """
    a, b = TokenBank.load(first), TokenBank.load(second)
    merged = a.merge(b, on_clash=on_clash)
    out = _save(merged, output, force=force, dtype=dtype)
    click.echo(f"wrote {out}: {_counts(merged)}")
    click.echo(f"note: name, description, training config and eval summary are kept from {first}", err=True)
    if a.readout is not None or b.readout is not None:
        click.echo("note: the merged bank has no decision readout (one was fit on an input's tokens only); it decides "
                   "by the refusal-opener margin until you fit one: edge-safe train readout", err=True)


# --- editing -------------------------------------------------------------------


@convert.command()
@click.argument("bank", type=PATH)
@click.argument("old")
@click.argument("new")
@click.option("-o", "--output", type=PATH, default=None, help="Write the result here instead of editing BANK.")
@force_option
def rename(bank: Path, old: str, new: str, output: Path | None, force: bool) -> None:
    """Rename a token or a profile (profiles follow a renamed token).

    \b
    Examples:
      edge-safe convert rename bank.gguf horror gore
      edge-safe convert rename bank.gguf kiosk health-kiosk -o kiosk.gguf
    """
    b = TokenBank.load(bank)
    what = "profile" if old in b.profiles else "token"
    edited = b.rename_profile(old, new) if what == "profile" else b.rename_token(old, new)
    out = _save(edited, output or bank, source=bank, force=force, dtype=stored_dtype(bank))
    click.echo(f"renamed {what} {old!r} to {new!r} in {out}")


@convert.command()
@click.argument("bank", type=PATH)
@click.argument("names", nargs=-1, required=True)
@click.option("--drop-from-profiles", is_flag=True, help="Also remove a token from the profiles that use it.")
@click.option("-o", "--output", type=PATH, default=None, help="Write the result here instead of editing BANK.")
@force_option
def remove(bank: Path, names: Sequence[str], drop_from_profiles: bool, output: Path | None, force: bool) -> None:
    """Remove tokens and/or profiles.

    \b
    Examples:
      edge-safe convert remove bank.gguf kiosk
      edge-safe convert remove bank.gguf medical --drop-from-profiles
    """
    b = TokenBank.load(bank)
    removed = []
    for name in names:
        if name in b.profiles:
            b, what = b.remove_profile(name), "profile"
        else:
            b, what = b.remove_token(name, drop_from_profiles=drop_from_profiles), "token"
        removed.append(f"{what} {name!r}")
    out = _save(b, output or bank, source=bank, force=force, dtype=stored_dtype(bank))
    click.echo(f"removed {', '.join(removed)} from {out}")


# --- interchange ---------------------------------------------------------------


@convert.command("export-npz")
@click.argument("bank", type=PATH)
@click.option("-o", "--output", type=PATH, required=True, help="The .npz to write.")
@force_option
def export_npz(bank: Path, output: Path, force: bool) -> None:
    """Export a bank as plain numpy: one array per token (two per deep token: name.k, name.v) plus __meta__ (JSON).

    \b
    Examples:
      edge-safe convert export-npz bank.gguf -o bank.npz
      python -c "import numpy as np; print(np.load('bank.npz')['alcohol'].shape)"
    """
    b = TokenBank.load(bank)
    click.echo(f"wrote {interchange.export_npz(b, output, force=force)}: {_counts(b)}")


@convert.command("import-npz")
@click.argument("npz", type=PATH)
@click.option("-o", "--output", type=PATH, required=True, help="The bank .gguf to write.")
@model_option
@force_option
@dtype_option
def import_npz(npz: Path, output: Path, model: Path | None, force: bool, dtype: str) -> None:
    """Import a .npz ({name: (n_vectors, n_embd)}, deep tokens as name.k / name.v of
    shape (n_positions, n_layer, width) [+ __meta__]) as a bank.

    Without __meta__, --model supplies the base model and every token is a constraint.

    \b
    Examples:
      edge-safe convert import-npz bank.npz -o bank.gguf
      edge-safe convert import-npz vectors.npz -o bank.gguf --model gemma-3-270m-q4_k_m.gguf
    """
    info = ModelInfo.read(resolve_model_path(model)) if model is not None else None
    _finish_import(interchange.import_npz(npz, info=info), info, output, force, dtype)


@convert.command("from-torch")
@click.argument("pt", type=PATH)
@click.option("-o", "--output", type=PATH, required=True, help="The bank .gguf to write.")
@model_option
@force_option
@dtype_option
def from_torch(pt: Path, output: Path, model: Path | None, force: bool, dtype: str) -> None:
    """Import a PyTorch file ({"state_dict": {name: tensor}, "metadata": {...}} or a bare {name: tensor}).

    \b
    Examples:
      edge-safe convert from-torch tokens.pt -o bank.gguf --model gemma-3-270m-q4_k_m.gguf
    """
    info = ModelInfo.read(resolve_model_path(model)) if model is not None else None
    _finish_import(interchange.import_torch(pt, info=info), info, output, force, dtype)


@convert.command("to-torch")
@click.argument("bank", type=PATH)
@click.option("-o", "--output", type=PATH, required=True, help="The .pt to write.")
@force_option
def to_torch(bank: Path, output: Path, force: bool) -> None:
    """Export a bank for PyTorch: {"state_dict": {name: tensor}, "metadata": {...}}.

    \b
    Examples:
      edge-safe convert to-torch bank.gguf -o bank.pt
    """
    b = TokenBank.load(bank)
    click.echo(f"wrote {interchange.export_torch(b, output, force=force)}: {_counts(b)}")


# --- helpers -------------------------------------------------------------------


def _finish_import(bank: TokenBank, info: ModelInfo | None, output: Path, force: bool, dtype: str) -> None:
    if info is not None:
        bank.check_model(info)
    out = _save(bank, output, force=force, dtype=dtype)
    click.echo(f"wrote {out}: {_counts(bank)}")


def _save(bank: TokenBank, output: Path, *, force: bool, dtype: str, source: Path | None = None) -> Path:
    """Save; rewriting the bank being edited (output == source) needs no --force."""
    same = source is not None and output.expanduser().resolve() == source.expanduser().resolve()
    return bank.save(output, force=force or same, dtype=dtype)


def _add_to_profiles(bank: TokenBank, name: str, profiles: Sequence[str]) -> TokenBank:
    if not profiles:
        return bank
    merged = {p: list(ms) for p, ms in bank.profiles.items()}
    for p in profiles:
        merged.setdefault(p, [])
        if name not in merged[p]:
            merged[p].append(name)
    edited = replace(bank, profiles=merged)
    edited.validate()
    return edited


def _counts(b: TokenBank) -> str:
    n_vec = sum(t.n_vectors for t in b.tokens.values() if not t.is_deep)
    parts = [(len(b.constraints), "constraint"), (len(b.modes), "mode"), (len(b.profiles), "profile")]
    out = ", ".join(_plural(n, w) for n, w in parts) + f", {_plural(n_vec, 'vector')} of {b.n_embd}"
    if b.deep_geometry is not None:
        n_layer, k, v = b.deep_geometry
        n_cells = sum(t.n_vectors for t in b.tokens.values() if t.is_deep)
        out += f", {_plural(n_cells, 'deep cell')} of {n_layer} layers x (K {k}, V {v})"
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _inspect_json(b: TokenBank, path: Path) -> dict:
    meta = interchange.bank_meta(b)
    for entry in meta["tokens"]:
        entry["n_vectors"] = b.tokens[entry["name"]].n_vectors
        entry["depth"] = b.tokens[entry["name"]].depth
        entry["origin"] = b.token_origin(entry["name"])
    if b.deep_geometry is not None:
        meta["deep"] = dict(zip(("n_layer", "n_embd_k_gqa", "n_embd_v_gqa"), b.deep_geometry))
    if b.readout is not None:
        meta["readout"] = {"n_ids": len(b.readout.ids), "offsets": list(b.readout.offsets), "fit": b.readout.fit,
                           "calibration": dict(b.readout.calibration)}
    meta["path"] = str(path)
    meta["origin_label"] = Origin.LABELS[b.origin]
    return meta


def format_bank(b: TokenBank, path: Path) -> str:
    """The human `inspect` view."""
    lines = [
        f"token bank   {path}",
        f"name         {b.name}",
        *([f"description  {b.description}"] if b.description else []),
        f"origin       {b.origin} ({Origin.LABELS[b.origin]})",
        f"base model   {b.base_name} ({b.arch}, n_embd {b.n_embd}, fingerprint {b.base_fingerprint[:12]})",
        f"layout       {b.layout}",
        f"template     {b.template.name}",
        f"format       v{interchange.bank_meta(b)['format_version']}; {_counts(b)}",
        *([f"deep cells   at position {b.deep_positions} (written into the KV cache, no prefill)"]
          if b.deep_geometry is not None else []),
        *([f"deep copies  " + ", ".join(f"x{c} from position {p}" for p, c in b.deep_copies)
           + " (written more than once past a long context)"] if b.deep_copies else []),
        *([f"readout      decides refusals: a linear probe of {len(b.readout.ids)} first-reply-token logits"
           + (f" and of the prompt rows {', '.join(map(str, b.readout.earlier))} tokens before it"
              if b.readout.earlier else "")
           + _readout_fit(b.readout.fit)] if b.readout is not None else []),
        *([f"calibration  stricter where active, log-odds (a composition takes its smallest): "
           + ", ".join(f"{c} +{s:g}" for c, s in b.readout.calibration.items())]
          if b.readout is not None and b.readout.calibration else []),
        "",
    ]
    if b.deep_geometry is None:
        rows = [("NAME", "KIND", "VECTORS", "ORIGIN", "DESCRIPTION")]
        rows += [(n, t.kind, str(t.n_vectors), b.token_origin(n), _clip(t.description)) for n, t in b.tokens.items()]
    else:  # a DEPTH column; VECTORS counts positions (vectors or KV cells)
        rows = [("NAME", "KIND", "DEPTH", "VECTORS", "ORIGIN", "DESCRIPTION")]
        rows += [(n, t.kind, t.depth, str(t.n_vectors), b.token_origin(n), _clip(t.description))
                 for n, t in b.tokens.items()]
    lines += _table(rows, right={2} if b.deep_geometry is None else {3})
    if b.profiles:
        lines += ["", *_table([("PROFILE", "TOKENS")] + [(p, ", ".join(ms)) for p, ms in b.profiles.items()])]
    if b.eval_summary:
        lines += ["", "eval summary", *(f"  {k}: {v}" for k, v in _flatten(b.eval_summary))]
    return "\n".join(lines)


def _readout_fit(fit: dict) -> str:
    val = (fit.get("val") or {}).get("all") or {}
    if val.get("auc") is None:
        return ""
    return f" (validation AUC {val['auc']}, {fit.get('val_cases', '?')} cases)"


def _table(rows: list[tuple[str, ...]], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    cell = lambda i, s: s.rjust(widths[i]) if i in right else s.ljust(widths[i])  # noqa: E731
    return ["  ".join(cell(i, s) for i, s in enumerate(r)).rstrip() for r in rows]


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", (f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, list) else v)
