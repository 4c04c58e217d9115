"""What the frozen base model does without tokens: reference answers and teacher distributions.

For every training prompt, the base model (no control tokens) answers greedily
for up to `ref_tokens` tokens (cut after its first line). The tokens are the
*reference continuation* of negatives (LM loss), and the top-k of its
distribution at each of those positions is the *teacher* of the
counterfactual-distillation KL. Computed once per (model, data, template,
settings) and cached on disk: the frozen model never changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from edge_safe.convert.layout import ChatTemplate
from edge_safe.training.base_model import BaseModel, cache_root

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    prompt_ids: list[list[int]]  # template token ids of each prompt (no BOS)
    ref_ids: list[list[int]]  # base model's greedy continuation (≥ 1 token)
    topk_ids: list[torch.Tensor]  # (len(ref), k) int64: teacher's top-k ids per reference position
    topk_logp: list[torch.Tensor]  # (len(ref), k) float32: their log-probabilities


def prompt_token_ids(base: BaseModel, texts: list, template: ChatTemplate) -> list[list[int]]:
    """Template token ids of each prompt: a text is one user turn, a list of messages a whole
    conversation rendered with ``template.render`` (exactly as the runtime renders it)."""
    return [base.tokenize(template.prompt(t) if isinstance(t, str) else template.render(t)) for t in texts]


def cache_key(base: BaseModel, texts: list, template: ChatTemplate, ref_tokens: int, topk: int) -> str:
    h = hashlib.sha256()
    fp = base.info.fingerprint if base.info else f"random-{base.model.config.hidden_size}"
    parts = [t if isinstance(t, str) else json.dumps(t, sort_keys=True) for t in texts]  # texts: same key as before
    for part in (fp, template.to_json(), str(ref_tokens), str(topk), *parts):
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()[:20]


def _fields(saved: dict) -> dict:
    return {k: v for k, v in saved.items() if k != "settings"}


def _cached_answers(folder: Path, settings: str) -> dict[tuple[int, ...], tuple]:
    """Answers per prompt (token ids) in earlier caches made with the same model, template and settings."""
    out: dict[tuple[int, ...], tuple] = {}
    for f in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
        try:
            saved = torch.load(f, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged or foreign file is only not reused
            continue
        if not isinstance(saved, dict) or saved.get("settings") != settings:
            continue
        for ids, ref, tids, tlp in zip(saved["prompt_ids"], saved["ref_ids"], saved["topk_ids"], saved["topk_logp"]):
            out[tuple(ids)] = (ref, tids, tlp)
    return out


def _first_line(base: BaseModel, ids: list[int]) -> int:
    """Number of tokens to keep: through the first newline or EOS (at least one)."""
    for j, t in enumerate(ids):
        if t in base.eos_ids or "\n" in base.detokenize([t]):
            return j + 1
    return len(ids)


@torch.no_grad()
def _greedy_batch(base: BaseModel, batch: list[list[int]], steps: int, topk: int):
    """Greedy-decode a left-padded batch; return per step (argmax ids, topk ids, topk logp)."""
    model = base.model
    width = max(len(x) for x in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    ids, mask = ids.to(base.device), mask.to(base.device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    steps_out = []
    for _ in range(steps):
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
        top = logp.topk(topk, dim=-1)
        nxt = top.indices[:, 0]
        steps_out.append((nxt, top.indices, top.values))
        mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(
            input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
            past_key_values=out.past_key_values, use_cache=True,
        )
    return steps_out


def build_teacher(
    base: BaseModel,
    texts: list[str],
    template: ChatTemplate,
    ref_tokens: int,
    topk: int,
    batch_size: int = 32,
    use_cache: bool = True,
    progress: bool = True,
) -> Teacher:
    key = cache_key(base, texts, template, ref_tokens, topk)
    path = cache_root() / "teacher" / f"{key}.pt"
    if use_cache and path.exists():
        log.info("teacher cache hit: %s", path)
        return Teacher(**_fields(torch.load(path, weights_only=True)))
    prompt_ids = prompt_token_ids(base, texts, template)
    settings = cache_key(base, [], template, ref_tokens, topk)
    ref_ids: list = [None] * len(texts)
    topk_ids: list = [None] * len(texts)
    topk_logp: list = [None] * len(texts)
    known = _cached_answers(path.parent, settings) if use_cache else {}
    for i, ids in enumerate(prompt_ids):  # prompts an earlier data set had: their answers, not recomputed
        if (hit := known.get(tuple(ids))) is not None:
            ref_ids[i], topk_ids[i], topk_logp[i] = hit
    todo = [i for i in range(len(texts)) if ref_ids[i] is None]
    if len(todo) < len(texts):
        log.info("teacher: %d of %d prompts from earlier caches", len(texts) - len(todo), len(texts))
    order = sorted(todo, key=lambda i: len(prompt_ids[i]))  # similar lengths share a batch
    bar = tqdm(total=len(order), desc="teacher (base model answers)", disable=not progress, unit="prompt")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        steps = _greedy_batch(base, [[base.bos_id] + prompt_ids[i] for i in idx], ref_tokens, topk)
        seq = torch.stack([s[0] for s in steps], dim=1).cpu()  # (B, steps)
        tids = torch.stack([s[1] for s in steps], dim=1).cpu()  # (B, steps, k)
        tlp = torch.stack([s[2] for s in steps], dim=1).cpu()
        for row, i in enumerate(idx):
            n = _first_line(base, seq[row].tolist())
            ref_ids[i] = seq[row, :n].tolist()
            topk_ids[i] = tids[row, :n].clone()
            topk_logp[i] = tlp[row, :n].clone()
        bar.update(len(idx))
    bar.close()
    teacher = Teacher(prompt_ids, ref_ids, topk_ids, topk_logp)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({**teacher.__dict__, "settings": settings}, tmp)
        tmp.replace(path)
    return teacher
