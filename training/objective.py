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

Deep tokens (``kind: deep``, :class:`DeepBank`) are key/value rows per layer instead
of input vectors: the prefix is the frozen model's KV cache (``DynamicCache``) holding
the BOS cell and each example's composition (padded and masked in the cache
dimension), and the conversation is decoded after it with explicit ``position_ids``
1, 2, ... -- the runtime's layout, where every deep cell sits at BOS's position 0 and
keys are used as stored (post-norm, post-RoPE).

A row may carry a *context*: token ids that come before the control tokens, as the runtime lays out
earlier turns, or the head of a long last message (``convert.layout.control_layout``). The frozen
model's K/V of ``[BOS][context]`` (no gradient: the context precedes the cells, so it never depends on
the bank; :class:`ContextKV` caches it) goes into the cache first, the deep cells follow with their keys
rotated to the context's last position (where the runtime writes them), and the request is decoded from
the position after it. Shallow vectors follow the context in the sequence.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edge_safe.convert.bank import copies_at
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


class DeepBank(torch.nn.Module):
    """Trainable deep tokens: per name, keys (n, n_layer, n_kv_heads * head_dim) and values of the
    same layout, model layer order (what the runtime writes into llama.cpp's KV cache), plus the
    frozen BOS cell (n_layer, width) every sequence starts with."""

    def __init__(self, init: dict[str, tuple[torch.Tensor, torch.Tensor]], bos: tuple[torch.Tensor, torch.Tensor],
                 fresh: list[str] | tuple[str, ...] = ()):
        super().__init__()
        self.names = list(init)
        self.fresh = list(fresh)  # tokens started from their rules' topic words (an init_bank lacked them)
        self.keys = torch.nn.ParameterDict({k: torch.nn.Parameter(kv[0].clone().float()) for k, kv in init.items()})
        self.values = torch.nn.ParameterDict({k: torch.nn.Parameter(kv[1].clone().float()) for k, kv in init.items()})
        self.register_buffer("bos_keys", bos[0].clone().float())
        self.register_buffer("bos_values", bos[1].clone().float())
        # ((position, copies), ...): cells sitting at or past `position` are laid out `copies` times, as the
        # runtime writes them for a bank with this deep_copies rule (TokenBank.copies_at)
        self.copies: tuple[tuple[int, int], ...] = ()

    def copies_at(self, position: int) -> int:
        return copies_at(self.copies, position)

    def cells(self, names: tuple[str, ...] | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The composition's keys and values: (sum n, n_layer, width) each (empty when no names)."""
        if not names:
            return self.bos_keys.new_zeros(0, *self.bos_keys.shape), self.bos_values.new_zeros(0, *self.bos_values.shape)
        return torch.cat([self.keys[n] for n in names]), torch.cat([self.values[n] for n in names])


def trainable_bank(base: BaseModel, bank) -> "Bank | DeepBank":
    """A loaded TokenBank as trainable parameters: :class:`Bank` (shallow) or :class:`DeepBank` (all deep)."""
    depths = {t.depth for t in bank.tokens.values()}
    if depths == {"shallow"}:
        return Bank.from_token_bank(bank)
    if depths != {"deep"}:
        from edge_safe.convert.errors import EdgeSafeError

        raise EdgeSafeError("training and validation take a bank of shallow tokens or of deep tokens, not a mix")
    init = {n: (torch.tensor(t.keys), torch.tensor(t.values)) for n, t in bank.tokens.items()}
    return DeepBank(init, bos_cell(base))


def kv_geometry(base: BaseModel) -> tuple[int, int, int]:
    """(n_layer, n_kv_heads, head_dim) of the model's attention."""
    cfg = base.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


def _cache_kwarg(base: BaseModel) -> str:
    """transformers 5.x renames ``past_key_values`` to ``cache``; use whichever this version takes."""
    params = inspect.signature(base.model.model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(base: BaseModel):
    from transformers import DynamicCache

    # every layer keeps every cell: a sliding-window layer's cache would drop a long context's head, which the
    # layout needs (masks, not the cache, keep a sliding layer to its window)
    return DynamicCache()


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]  # older transformers


@torch.no_grad()
def kv_of_inputs(base: BaseModel, vectors: torch.Tensor, before_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values the frozen model computes for ``vectors`` (m, d) laid out after BOS at positions
    1..m: (m, n_layer, n_kv_heads * head_dim) each, as llama.cpp stores them. Initialises a deep token from
    input vectors (a shallow token, topic words), so its step 0 acts like those vectors.

    ``before_prompt``: the keys are then rotated back by m positions (RoPE composes), as if the vectors had
    sat at 1-m..0, right before a prompt that starts at position 1 -- where the deep layout puts it -- so the
    prompt sees them at the distances it saw the vectors at in the shallow layout (the values carry no
    position). Without it the keys keep positions 1..m, which the prompt then overlaps."""
    keys, values = _kv_at(base, vectors)
    return (rotate_keys(base, keys, -len(vectors)) if before_prompt and len(vectors) else keys), values


@torch.no_grad()
def rotate_keys(base: BaseModel, keys: torch.Tensor, delta: int) -> torch.Tensor:
    """Post-RoPE keys (m, n_layer, width) moved by ``delta`` positions: RoPE(k, p) -> RoPE(k, p + delta), each
    layer with its own rotary embedding (Gemma 3: local base for sliding layers, global for full ones)."""
    return shift_keys(base, keys, delta)


def shift_keys(base: BaseModel, keys: torch.Tensor, delta: int) -> torch.Tensor:
    """:func:`rotate_keys` with gradients: trainable cells written at a later position (after a context)."""
    import sys

    n_layer, n_heads, head_dim = kv_geometry(base)
    inner = base.model.model
    apply_rope = sys.modules[type(inner).__module__].apply_rotary_pos_emb
    layer_types = getattr(base.model.config, "layer_types", None)
    m = keys.shape[0]
    pos = torch.full((1, m), int(delta), device=keys.device)
    out = []
    for layer in range(n_layer):
        args = (layer_types[layer],) if layer_types else ()
        cos, sin = inner.rotary_emb(keys, pos, *args)  # (1, m, head_dim)
        k = keys[:, layer].reshape(m, n_heads, head_dim).transpose(0, 1)[None]  # (1, H, m, head_dim)
        _, rotated = apply_rope(k, k, cos.to(k.dtype), sin.to(k.dtype)) if delta else (k, k)
        out.append(rotated[0].transpose(0, 1).reshape(m, n_heads * head_dim))
    return torch.stack(out, dim=1)


@torch.no_grad()
def _kv_at(base: BaseModel, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V rows of ``vectors`` decoded after BOS at positions 1..m (no rotation back)."""
    n_layer, n_heads, head_dim = kv_geometry(base)
    x = torch.cat([base.embed(torch.tensor([base.bos_id])), vectors.to(base.device).float()])[None]
    cache = _new_cache(base)
    base.model.model(inputs_embeds=x, use_cache=True, **{_cache_kwarg(base): cache})
    ks, vs = [], []
    for layer in range(n_layer):
        k, v = _layer_kv(cache, layer)  # (1, H, 1 + m, head_dim)
        ks.append(k[0, :, 1:].transpose(0, 1).reshape(-1, n_heads * head_dim))
        vs.append(v[0, :, 1:].transpose(0, 1).reshape(-1, n_heads * head_dim))
    return torch.stack(ks, dim=1).float(), torch.stack(vs, dim=1).float()


@torch.no_grad()
def bos_cell(base: BaseModel) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS's own keys and values (n_layer, width): at run time BOS is decoded before any deep cell exists."""
    n_layer, n_heads, head_dim = kv_geometry(base)
    cache = _new_cache(base)
    base.model.model(input_ids=torch.tensor([[base.bos_id]], device=base.device), use_cache=True,
                     **{_cache_kwarg(base): cache})
    pairs = [_layer_kv(cache, layer) for layer in range(n_layer)]
    return (torch.stack([k[0, :, 0].reshape(-1) for k, _ in pairs]).float(),
            torch.stack([v[0, :, 0].reshape(-1) for _, v in pairs]).float())


class ContextKV:
    """The frozen model's keys and values of ``[BOS][context]`` at positions 1..L, per context (a tuple of token
    ids), each (L, n_layer, width); computed once without gradient and kept (bfloat16) up to ``max_positions``
    positions in all, the oldest dropped first."""

    def __init__(self, base: BaseModel, max_positions: int = 200_000):
        self.base, self.max_positions = base, max_positions
        self._memo: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._held = 0

    def __call__(self, ids: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tuple(ids)
        if ids in self._memo:
            k, v = self._memo[ids]
            return k.float(), v.float()
        keys, values = kv_of_inputs(self.base, self.base.embed(torch.tensor(ids)), before_prompt=False)
        while self._memo and self._held + len(ids) > self.max_positions:
            old = next(iter(self._memo))
            self._held -= len(old)
            del self._memo[old]
        self._memo[ids] = (keys.to(torch.bfloat16), values.to(torch.bfloat16))
        self._held += len(ids)
        return keys, values


@dataclass
class DeepPrefix:
    """A batch's deep prefix: per layer (B, n_kv_heads, C, head_dim) keys and values, C = 1 (BOS) + the longest
    context + the longest composition's cells, a (B, C) mask that is 0 on the padding cells, and each row's
    context length (B,): its cells sit at that position, its request starts after it."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    offsets: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # (B, C) each cell's position (BOS 0, context 1..n, its cells n)


def deep_prefix(base: BaseModel, bank: DeepBank, cells: list[tuple[torch.Tensor, torch.Tensor]],
                contexts: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None) -> DeepPrefix:
    _, n_heads, head_dim = kv_geometry(base)
    contexts = contexts or [None] * len(cells)
    lengths = [0 if c is None else len(c[0]) for c in contexts]
    # identical rows where the runtime writes them more than once (the bank's rule, by where they sit)
    cells = [(torch.cat([k] * c), torch.cat([v] * c)) if (c := bank.copies_at(n)) > 1 else (k, v)
             for (k, v), n in zip(cells, lengths)]
    n_ctx, n_cells = max(lengths), max(len(k) for k, _ in cells)
    width = 1 + n_ctx + n_cells
    rows_k, rows_v = [], []
    dev = bank.bos_keys.device
    mask = torch.zeros(len(cells), width, dtype=torch.long, device=dev)
    where = torch.zeros(len(cells), width, dtype=torch.long, device=dev)
    for b, ((k, v), ctx, n) in enumerate(zip(cells, contexts, lengths)):
        if n:
            k = shift_keys(base, k, n)  # written where the runtime writes them: at the context's last position
        ck, cv = (ctx[0].to(dev), ctx[1].to(dev)) if n else (k[:0], v[:0])
        gap = k.new_zeros(n_ctx - n, *k.shape[1:])
        pad = k.new_zeros(n_cells - len(k), *k.shape[1:])
        rows_k.append(torch.cat([bank.bos_keys[None], ck, gap, k, pad]))
        rows_v.append(torch.cat([bank.bos_values[None], cv, gap, v, pad]))
        mask[b, : 1 + n] = 1
        mask[b, 1 + n_ctx: 1 + n_ctx + len(k)] = 1
        where[b, : 1 + n] = torch.arange(1 + n, device=dev)
        where[b, 1 + n_ctx:] = n
    K, V = torch.stack(rows_k), torch.stack(rows_v)  # (B, C, n_layer, width)
    B, C, n_layer, _ = K.shape
    split = lambda t, layer: t[:, :, layer].reshape(B, C, n_heads, head_dim).transpose(1, 2)  # noqa: E731
    offsets = torch.tensor(lengths, device=dev) if any(lengths) else None
    return DeepPrefix([split(K, i) for i in range(n_layer)], [split(V, i) for i in range(n_layer)], mask, offsets,
                      where if offsets is not None else None)


def position_masks(base: BaseModel, prefix: DeepPrefix, mask: torch.Tensor, positions: torch.Tensor) -> dict:
    """Per layer type, the (B, 1, T, C + T) attention masks of a batch decoded after ``prefix``, by each cell's
    and token's true position, as llama.cpp masks them: a query sees a real cell or token at or before its own
    position, and in sliding-window layers only one less than ``sliding_window`` positions back. (Rows'
    contexts differ in length, so cache index and position differ: transformers' own masks go by index.)"""
    cfg = base.model.config
    keys = torch.cat([prefix.positions, positions], dim=1)  # (B, C + T)
    real = torch.cat([prefix.mask, mask], dim=1).bool()
    seen = real[:, None, :] & (keys[:, None, :] <= positions[:, :, None])  # (B, T, C + T)
    B, T = mask.shape
    C = prefix.mask.shape[1]
    eye = torch.zeros(T, C + T, dtype=torch.bool, device=mask.device)
    eye[:, C:] = torch.eye(T, dtype=torch.bool, device=mask.device)
    seen = seen | eye  # a padding position sees itself: no row of a mask is empty
    window = getattr(cfg, "sliding_window", None)
    out = {}
    for kind in set(getattr(cfg, "layer_types", None) or ["full_attention"]):
        m = seen
        if kind == "sliding_attention" and window:
            m = seen & ((positions[:, :, None] - keys[:, None, :]) < window) | eye
        m = m[:, None]
        if getattr(cfg, "_attn_implementation", "sdpa") == "eager":
            m = torch.zeros(m.shape, device=m.device).masked_fill(~m, torch.finfo(torch.float32).min)
        out[kind] = m
    return out


def forward_hidden(base: BaseModel, embeds: torch.Tensor, mask: torch.Tensor,
                   prefix: DeepPrefix | None = None, every_layer: bool = False) -> "torch.Tensor | tuple":
    """Last hidden states (B, T, d) of right-padded inputs, after a deep prefix when given; with
    ``every_layer``, transformers' tuple of n_layer + 1 such tensors instead (the input embeddings, each
    block's output, the last one after the final norm).

    Shallow: ``embeds`` holds [BOS][vectors][tokens] at positions 0.. . Deep: ``embeds`` holds the tokens
    only, at positions 1.. (BOS and every deep cell are at 0, in the cache)."""
    pick = (lambda o: o.hidden_states) if every_layer else (lambda o: o.last_hidden_state)  # noqa: E731
    if prefix is None:
        return pick(base.model.model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=every_layer))
    cache = _new_cache(base)
    for layer, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
        cache.update(k.to(embeds.dtype), v.to(embeds.dtype), layer)
    B, T = mask.shape
    positions = torch.arange(1, T + 1, device=embeds.device).expand(B, T)
    if prefix.offsets is not None:
        positions = positions + prefix.offsets[:, None]
    full = torch.cat([prefix.mask, mask], dim=1)
    if prefix.positions is not None:  # rows after contexts: masks by true position
        full = position_masks(base, prefix, mask, positions)
    out = base.model.model(inputs_embeds=embeds, attention_mask=full, position_ids=positions, use_cache=True,
                           output_hidden_states=every_layer, **{_cache_kwarg(base): cache})
    return pick(out)


def batch_inputs(base: BaseModel, bank: "Bank | DeepBank", rows: list[tuple],
                 context_kv: ContextKV | None = None) -> tuple[torch.Tensor, torch.Tensor, DeepPrefix | None]:
    """(embeds, mask, deep prefix or None) of (mode, constraints, ids) or (mode, constraints, ids, context)
    rows, right-padded; the last real position of each row is where its ids end (as in :func:`layout`)."""
    rows = [tuple(r) + ((),) * (4 - len(r)) for r in rows]
    if isinstance(bank, DeepBank):
        seqs, cells, contexts = [], [], []
        kv = context_kv if context_kv is not None else ContextKV(base)
        for mode, constraints, ids, ctx in rows:
            seqs.append(base.embed(torch.tensor(list(ids))))
            cells.append(bank.cells(((mode,) if mode else ()) + tuple(constraints)))
            contexts.append(kv(tuple(ctx)) if ctx else None)
        embeds, mask = pad_right(seqs)
        return embeds, mask, deep_prefix(base, bank, cells, contexts)
    embeds, mask = pad_right([layout(base, bank, m, c, ids, ctx) for m, c, ids, ctx in rows])
    return embeds, mask, None


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
    prefix: DeepPrefix | None = None  # deep tokens: the KV prefix the embeds follow
    anchors: torch.Tensor | None = None  # (B,) bool: the example is distilled from the anchor bank, not a label
    anchor_logp: torch.Tensor | None = None  # (A, V) the anchor bank's first-reply log-probabilities, anchors' order


def layout(base: BaseModel, bank: Bank, mode: str | None, constraints: tuple[str, ...], ids: list[int],
           context: tuple[int, ...] = ()) -> torch.Tensor:
    """Input embeddings of one sequence: [BOS][context][mode][constraints...][ids] -> (T, d)."""
    names = ((mode,) if mode else ()) + tuple(constraints)
    head = base.embed(torch.tensor([base.bos_id] + list(context)))  # scaled like llama.cpp token inputs
    return torch.cat([head, bank.prefix(names), base.embed(torch.tensor(list(ids)))], dim=0)


def build_batch(
    base: BaseModel, bank: "Bank | DeepBank", teacher: Teacher, refusal_ids: dict[str, list[int]],
    examples: list[Example], first_token_weight: float, refusal_weight: float = 1.0,
    context_of=None, context_kv: ContextKV | None = None, anchor_bank: "Bank | DeepBank | None" = None,
) -> Batch:
    """``context_of(example) -> (context ids, request ids, teacher applies)`` lays an example out after a
    context (default: none, the request is the teacher's prompt). Where the teacher's answer was made without
    that context (``teacher applies`` False), an answer is trained by the decision loss alone. Anchor
    examples (``Example.anchor``) carry no label: ``anchor_bank``'s first-reply distribution on the same layout
    is their target (:func:`mosaic_loss`)."""
    inputs, rows, cols, targets, weights, kl, tids, tlp, first = [], [], [], [], [], [], [], [], []
    anchor_rows = []
    k = teacher.topk_ids[0].shape[1]
    deep = isinstance(bank, DeepBank)
    for b, ex in enumerate(examples):
        context, prompt, exact = context_of(ex) if context_of else ((), teacher.prompt_ids[ex.prompt], True)
        target = refusal_ids[ex.refuse] if ex.refuse else teacher.ref_ids[ex.prompt]
        ids = list(prompt) + target[:-1]
        inputs.append((ex.mode, ex.constraints, ids, tuple(context)))
        if ex.anchor:
            anchor_rows.append((ex.mode, ex.constraints, list(prompt), tuple(context)))
        n_prefix = 0 if deep else 1 + len(context) + len(bank.prefix(((ex.mode,) if ex.mode else ()) + tuple(ex.constraints)))
        start = n_prefix + len(ids) - len(target)  # logits at `start` predict target[0]
        w = torch.ones(len(target))
        w[0] = first_token_weight
        w = w / w.sum() * (refusal_weight if ex.refuse else 1.0)
        is_answer = ex.refuse is None and not ex.anchor
        if (is_answer and not exact) or ex.anchor:
            w = torch.zeros(len(target))  # the teacher answered without this context: decision loss only
        first.append(len(rows))
        for j, t in enumerate(target):
            rows.append(b)
            cols.append(start + j)
            targets.append(t)
        weights.append(w)
        kl.extend([is_answer and exact] * len(target))
        if ex.refuse is None:
            tids.append(teacher.topk_ids[ex.prompt])
            tlp.append(teacher.topk_logp[ex.prompt])
        else:
            tids.append(torch.zeros(len(target), k, dtype=torch.long))
            tlp.append(torch.zeros(len(target), k))
    embeds, mask, prefix = batch_inputs(base, bank, inputs, context_kv)
    dev = embeds.device
    anchors = torch.tensor([ex.anchor for ex in examples], device=dev)
    anchor_logp = None
    if anchors.any():
        if anchor_bank is None:
            raise ValueError("anchor examples need the anchor bank")
        anchor_logp = first_reply_logp(base, anchor_bank, anchor_rows, context_kv)
    return Batch(
        embeds, mask, torch.tensor(rows, device=dev), torch.tensor(cols, device=dev),
        torch.tensor(targets, device=dev), torch.cat(weights).to(dev), torch.tensor(kl, device=dev),
        torch.cat(tids).to(dev), torch.cat(tlp).to(dev), torch.tensor(first, device=dev),
        torch.tensor([ex.refuse is not None for ex in examples], device=dev), prefix, anchors, anchor_logp,
    )


@torch.no_grad()
def first_reply_logits(base: BaseModel, bank: "Bank | DeepBank", rows: list[tuple],
                       context_kv: ContextKV | None = None) -> torch.Tensor:
    """Logits (B, V) of the first reply token of (mode, constraints, prompt ids[, context]) rows under ``bank``:
    the output at each row's last prompt position, where the runtime decides."""
    embeds, mask, prefix = batch_inputs(base, bank, rows, context_kv)
    hidden = forward_hidden(base, embeds, mask, prefix)
    h = hidden[torch.arange(len(rows), device=hidden.device), mask.sum(1) - 1]
    return base.model.lm_head(h).float()


def first_reply_logp(base: BaseModel, bank: "Bank | DeepBank", rows: list[tuple],
                     context_kv: ContextKV | None = None) -> torch.Tensor:
    """:func:`first_reply_logits` as log-probabilities (B, V)."""
    return torch.log_softmax(first_reply_logits(base, bank, rows, context_kv), dim=-1)


def pad_right(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (T_i, d) sequences into (B, T, d) + mask; right padding keeps positions 0..T_i-1 as at run time."""
    width = max(s.shape[0] for s in seqs)
    embeds = seqs[0].new_zeros(len(seqs), width, seqs[0].shape[1])
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=seqs[0].device)
    for b, s in enumerate(seqs):
        embeds[b, : s.shape[0]] = s
        mask[b, : s.shape[0]] = 1
    return embeds, mask


def loss_positions_logits(base: BaseModel, batch: Batch) -> torch.Tensor:
    """Logits over the vocabulary at the loss positions only: (N, V)."""
    hidden = forward_hidden(base, batch.embeds, batch.mask, batch.prefix)
    h = hidden[batch.rows, batch.cols]  # (N, d)
    return base.model.lm_head(h).float()


def loss_positions_logp(base: BaseModel, batch: Batch) -> torch.Tensor:
    """Log-probabilities over the vocabulary at the loss positions only: (N, V)."""
    return torch.log_softmax(loss_positions_logits(base, batch), dim=-1)


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
    per_example = torch.where(batch.refuses, -logp, -torch.log1p(-logp.exp()))
    return per_example * decided(batch, refuse_id)


def decided(batch: Batch, refuse_id: int) -> torch.Tensor:
    """(B,) bool: the examples a binary refuse/answer loss counts: every refusal, and answers other than
    anchor examples (their decision is the anchor bank's, anchor_kl) and those whose own reference starts with
    the refusal opener."""
    answer_ok = batch.targets[batch.first] != refuse_id
    if batch.anchors is not None:
        answer_ok = answer_ok & ~batch.anchors
    return batch.refuses | answer_ok


def readout_loss(logits: torch.Tensor, batch: Batch, readout: "ReadoutTerm", refuse_id: int) -> torch.Tensor:
    """Binary cross-entropy of the decision readout's score at each example's first reply position: (B,).

    score = weights · logits[ids] + bias is the log-odds of refusing the runtime decides by
    (convert/readout.py); refusals: softplus(-score), answers: softplus(score). Masked as
    :func:`decision_loss`: anchor examples, and answers whose own reference starts with the opener, add none."""
    score = readout.score(logits[batch.first])
    per_example = torch.where(batch.refuses, F.softplus(-score), F.softplus(score))
    return per_example * decided(batch, refuse_id)


@dataclass
class ReadoutTerm:
    """A bank's decision readout as tensors (frozen): token ids, weights, bias."""

    ids: torch.Tensor  # (K,) long
    weights: torch.Tensor  # (K,) float32
    bias: float

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-odds of refusing per row of first-reply-token logits (B, V): (B,)."""
        return logits[:, self.ids] @ self.weights + self.bias

    @classmethod
    def of(cls, readout, device) -> "ReadoutTerm":
        return cls(torch.as_tensor(readout.ids, dtype=torch.long, device=device),
                   torch.as_tensor(readout.weights, dtype=torch.float32, device=device), float(readout.bias))


def anchor_kl(logq: torch.Tensor, batch: Batch) -> torch.Tensor:
    """KL(p_anchor ‖ q) over the whole vocabulary at each anchor example's first reply position: (A,)."""
    lq = logq[batch.first[batch.anchors]]
    p = batch.anchor_logp.exp()
    return (p * (batch.anchor_logp - lq)).sum(-1)


def mosaic_loss(
    base: BaseModel, batch: Batch, kl_weight: float, decision_weight: float = 0.0, refuse_id: int | None = None,
    anchor_weight: float = 1.0, readout: ReadoutTerm | None = None, readout_weight: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    logits = loss_positions_logits(base, batch)
    logq = torch.log_softmax(logits, dim=-1)
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
    if readout_weight and readout is not None and refuse_id is not None:
        ro = readout_loss(logits, batch, readout, refuse_id)
        loss = loss + readout_weight * ro.mean()
        stats["readout"] = float(ro.detach().mean())
    if batch.anchor_logp is not None:
        anchored = anchor_kl(logq, batch)
        loss = loss + anchor_weight * anchored.sum() / n_examples
        stats["anchor"] = float(anchored.detach().mean())
    return loss, stats
