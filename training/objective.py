"""The control-token bank as parameters, the shared input layout, and the MOSAIC loss.

Inputs are laid out exactly as the runtime lays them out (convert/layout.py):
``[BOS] [mode vectors] [constraint vectors ...] <template tokens> <target tokens>``
in transformers' ``inputs_embeds`` space, which is llama.cpp's raw-embedding
space (both scale *token* embeddings by sqrt(n_embd); injected vectors are not
scaled), so trained vectors are exported unchanged.

Loss per example (averaged over its target positions, then over the batch):
- refuse: cross-entropy on the fixed refusal text (first token weighted more);
- answer: cross-entropy on the base model's own greedy answer
  + λ · KL(p_base ‖ p_ctrl), the teacher's top-k plus a "rest" bucket;
- both, with `decision_weight` > 0: + the binary cross-entropy of "the first reply
  token is the refusal opener" (see `decision_loss`).
Logits are computed only at positions that carry loss: the 262 k-word output
layer dominates CPU cost.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edge_safe.training.base_model import BaseModel
from edge_safe.training.sampler import Example
from edge_safe.training.teacher import Teacher


class Bank(torch.nn.Module):
    """Trainable vectors: one (n_vectors, n_embd) parameter per token name."""

    def __init__(self, init: dict[str, torch.Tensor]):
        super().__init__()
        self.names = list(init)
        self.vectors = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone().float()) for k, v in init.items()})

    @classmethod
    def from_token_bank(cls, bank) -> "Bank":
        """A loaded TokenBank's vectors as parameters (the inverse of trainer.export_bank)."""
        return cls({n: torch.tensor(t.vectors, dtype=torch.float32) for n, t in bank.tokens.items()})

    def prefix(self, names: tuple[str, ...] | list[str]) -> torch.Tensor:
        d = next(iter(self.vectors.values())).shape[1]
        if not names:
            return torch.zeros(0, d, device=next(iter(self.vectors.values())).device)
        return torch.cat([self.vectors[n] for n in names], dim=0)  # (sum m, d)


@dataclass
class Batch:
    embeds: torch.Tensor  # (B, T, d)
    mask: torch.Tensor  # (B, T)
    rows: torch.Tensor  # (N,) batch row of each loss position
    cols: torch.Tensor  # (N,) sequence position whose logits predict the target
    targets: torch.Tensor  # (N,) target token ids
    weights: torch.Tensor  # (N,) per-position weight, rows sum to 1 per example
    kl_rows: torch.Tensor  # (N,) bool: position carries a KL term
    topk_ids: torch.Tensor  # (N, k) teacher top-k ids (zeros where no KL)
    topk_logp: torch.Tensor  # (N, k)
    first: torch.Tensor  # (B,) index into the N loss positions of each example's first target token
    refuses: torch.Tensor  # (B,) bool: the example's target is a refusal


def layout(base: BaseModel, bank: Bank, mode: str | None, constraints: tuple[str, ...], ids: list[int]) -> torch.Tensor:
    """Input embeddings of one sequence: [BOS][mode][constraints...][ids] -> (T, d)."""
    names = ((mode,) if mode else ()) + tuple(constraints)
    tok = base.embed(torch.tensor([base.bos_id] + list(ids)))  # scaled like llama.cpp token inputs
    return torch.cat([tok[:1], bank.prefix(names), tok[1:]], dim=0)


def build_batch(
    base: BaseModel, bank: Bank, teacher: Teacher, refusal_ids: dict[str, list[int]],
    examples: list[Example], first_token_weight: float, refusal_weight: float = 1.0,
) -> Batch:
    seqs, rows, cols, targets, weights, kl, tids, tlp, first = [], [], [], [], [], [], [], [], []
    k = teacher.topk_ids[0].shape[1]
    for b, ex in enumerate(examples):
        prompt = teacher.prompt_ids[ex.prompt]
        target = refusal_ids[ex.refuse] if ex.refuse else teacher.ref_ids[ex.prompt]
        x = layout(base, bank, ex.mode, ex.constraints, prompt + target[:-1])
        seqs.append(x)
        start = x.shape[0] - len(target)  # logits at `start` predict target[0]
        w = torch.ones(len(target))
        w[0] = first_token_weight
        w = w / w.sum() * (refusal_weight if ex.refuse else 1.0)
        first.append(len(rows))
        for j, t in enumerate(target):
            rows.append(b)
            cols.append(start + j)
            targets.append(t)
        weights.append(w)
        is_answer = ex.refuse is None
        kl.extend([is_answer] * len(target))
        if is_answer:
            tids.append(teacher.topk_ids[ex.prompt])
            tlp.append(teacher.topk_logp[ex.prompt])
        else:
            tids.append(torch.zeros(len(target), k, dtype=torch.long))
            tlp.append(torch.zeros(len(target), k))
    embeds, mask = pad_right(seqs)
    dev = embeds.device
    return Batch(
        embeds, mask, torch.tensor(rows, device=dev), torch.tensor(cols, device=dev),
        torch.tensor(targets, device=dev), torch.cat(weights).to(dev), torch.tensor(kl, device=dev),
        torch.cat(tids).to(dev), torch.cat(tlp).to(dev), torch.tensor(first, device=dev),
        torch.tensor([ex.refuse is not None for ex in examples], device=dev),
    )


def pad_right(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (T_i, d) sequences into (B, T, d) + mask; right padding keeps positions 0..T_i-1 as at run time."""
    width = max(s.shape[0] for s in seqs)
    embeds = seqs[0].new_zeros(len(seqs), width, seqs[0].shape[1])
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=seqs[0].device)
    for b, s in enumerate(seqs):
        embeds[b, : s.shape[0]] = s
        mask[b, : s.shape[0]] = 1
    return embeds, mask


def loss_positions_logp(base: BaseModel, batch: Batch) -> torch.Tensor:
    """Log-probabilities over the vocabulary at the loss positions only: (N, V)."""
    hidden = base.model.model(inputs_embeds=batch.embeds, attention_mask=batch.mask).last_hidden_state
    h = hidden[batch.rows, batch.cols]  # (N, d)
    return torch.log_softmax(base.model.lm_head(h).float(), dim=-1)


def topk_kl(logq: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row with p known on its top-k and the rest lumped into one bucket."""
    lq = logq.gather(1, topk_ids)  # (N, k)
    p = topk_logp.exp()
    head = (p * (topk_logp - lq)).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp(min=1e-8)
    q_rest = (1 - lq.exp().sum(-1)).clamp(min=1e-8)
    return head + p_rest * (p_rest.log() - q_rest.log())


def decision_loss(logq: torch.Tensor, batch: Batch, refuse_id: int) -> torch.Tensor:
    """Binary cross-entropy of the refuse/answer decision at each example's first reply position: (B,).

    p = P(first token = the refusal opener). Refusals: -log p; answers: -log(1 - p). The
    per-token cross-entropy alone never pushes p down on answers (only the reference token up),
    yet "the opener wins or not" is exactly what greedy decoding acts on. Answers whose own
    reference starts with the opener get no decision term.
    """
    logp = logq[batch.first, refuse_id].clamp(max=-1e-6)
    answer_ok = batch.targets[batch.first] != refuse_id
    per_example = torch.where(batch.refuses, -logp, -torch.log1p(-logp.exp()))
    return per_example * (batch.refuses | answer_ok)


def mosaic_loss(
    base: BaseModel, batch: Batch, kl_weight: float, decision_weight: float = 0.0, refuse_id: int | None = None
) -> tuple[torch.Tensor, dict]:
    logq = loss_positions_logp(base, batch)
    nll = F.nll_loss(logq, batch.targets, reduction="none")  # (N,)
    kl = torch.zeros_like(nll)
    if batch.kl_rows.any():
        sel = batch.kl_rows
        kl[sel] = topk_kl(logq[sel], batch.topk_ids[sel], batch.topk_logp[sel])
    per_pos = nll + kl_weight * kl
    n_examples = int(batch.rows.max()) + 1
    loss = (per_pos * batch.weights).sum() / n_examples
    stats = {
        "nll": float((nll.detach() * batch.weights).sum() / n_examples),
        "kl": float(kl.detach()[batch.kl_rows].mean()) if batch.kl_rows.any() else 0.0,
    }
    if decision_weight and refuse_id is not None:
        dec = decision_loss(logq, batch, refuse_id)
        loss = loss + decision_weight * dec.mean()
        stats["dec"] = float(dec.detach().mean())
    return loss, stats
