"""Deep-token training on a tiny random-weight Gemma 3 (seconds on CPU): the KV prefix, its padding, positions."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge_safe.convert.bank import TokenBank  # noqa: E402
from edge_safe.training.base_model import tiny_random_model  # noqa: E402
from edge_safe.training.config import TrainConfig  # noqa: E402
from edge_safe.training.objective import (  # noqa: E402
    DeepBank,
    batch_inputs,
    bos_cell,
    forward_hidden,
    kv_of_inputs,
    trainable_bank,
)
from edge_safe.training.trainer import export_bank, init_deep, param_groups, train  # noqa: E402
from tests.test_training import cfg, write_data  # noqa: E402,F401  (the tiny data set and config)

N_LAYER, WIDTH = 2, 32  # tiny_random_model: 2 layers, 1 KV head of 32


@pytest.fixture(scope="module")
def base():
    return tiny_random_model()


def random_deep(base, names=("positive", "alcohol", "gambling"), n=(1, 2, 3), seed=0) -> DeepBank:
    g = torch.Generator().manual_seed(seed)
    init = {name: (torch.randn(m, N_LAYER, WIDTH, generator=g), torch.randn(m, N_LAYER, WIDTH, generator=g))
            for name, m in zip(names, n)}
    return DeepBank(init, bos_cell(base))


@torch.no_grad()
def test_an_empty_deep_prefix_is_the_plain_sequence_after_bos(base):
    """BOS's cell in the cache + tokens at positions 1.. == the plain forward of [BOS] + tokens."""
    bank = random_deep(base)
    ids = [5, 6, 7, 8]
    x, mask, prefix = batch_inputs(base, bank, [(None, (), ids)])
    assert prefix.mask.tolist() == [[1]] and x.shape == (1, 4, 64)
    deep = forward_hidden(base, x, mask, prefix)[0]
    plain = base.model.model(input_ids=torch.tensor([[base.bos_id] + ids])).last_hidden_state[0, 1:]
    torch.testing.assert_close(deep, plain, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_kv_of_inputs_as_a_prefix_equals_the_vectors_in_the_sequence(base):
    """K/V computed for vectors after BOS, put in the cache, then tokens at the positions they would have had:
    the same hidden states as the vectors decoded inline (the deep prefix is what the vectors leave in the cache)."""
    vectors = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    keys, values = kv_of_inputs(base, vectors, before_prompt=False)
    assert keys.shape == values.shape == (3, N_LAYER, WIDTH)
    bank = DeepBank({"alcohol": (keys, values)}, bos_cell(base))
    ids = [9, 10, 11]
    x, mask, prefix = batch_inputs(base, bank, [(None, ("alcohol",), ids)])
    from edge_safe.training import objective

    cache = objective._new_cache(base)
    for layer, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
        cache.update(k, v, layer)
    pos = torch.arange(4, 7)[None]  # after BOS (0) and the three vectors (1..3)
    deep = base.model.model(inputs_embeds=x, position_ids=pos, use_cache=True,
                            **{objective._cache_kwarg(base): cache}).last_hidden_state[0]
    inline = torch.cat([base.embed(torch.tensor([base.bos_id])), vectors, base.embed(torch.tensor(ids))])[None]
    plain = base.model.model(inputs_embeds=inline).last_hidden_state[0, 4:]
    torch.testing.assert_close(deep, plain, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_keys_before_the_prompt_are_the_keys_rotated_back_by_the_token_length(base):
    """Layer 0's key of an input depends on its position only through RoPE: the key of v decoded at position 5
    equals v's key at position 1 moved by +4, and before_prompt moves a token's keys to 1-m..0."""
    from edge_safe.training.objective import rotate_keys

    g = torch.Generator().manual_seed(2)
    v, filler = torch.randn(1, 64, generator=g), torch.randn(4, 64, generator=g)
    at1, _ = kv_of_inputs(base, v, before_prompt=False)
    at5, _ = kv_of_inputs(base, torch.cat([filler, v]), before_prompt=False)
    torch.testing.assert_close(rotate_keys(base, at1, 4)[:, 0], at5[4:, 0], rtol=1e-5, atol=1e-5)
    assert (at1[:, 0] - at5[4:, 0]).abs().max() > 1e-2  # the position does change the key
    vectors = torch.cat([filler, v])
    shifted, values = kv_of_inputs(base, vectors)
    torch.testing.assert_close(rotate_keys(base, shifted, 5), at5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, kv_of_inputs(base, vectors, before_prompt=False)[1])


@torch.no_grad()
def test_compositions_of_different_lengths_are_padded_and_masked_in_the_cache(base):
    """An example's hidden states do not depend on the other rows of its batch (longer compositions, longer
    prompts): padding cells and padding tokens are masked."""
    bank = random_deep(base)
    rows = [("positive", ("alcohol",), [5, 6, 7]), (None, (), [8, 9]), ("positive", ("gambling", "alcohol"), [5, 6, 7, 8, 9, 10])]
    x, mask, prefix = batch_inputs(base, bank, rows)
    assert prefix.mask.tolist() == [[1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [1] * 7]
    assert prefix.keys[0].shape == (3, 1, 7, WIDTH)
    together = forward_hidden(base, x, mask, prefix)
    for b, row in enumerate(rows):
        xa, ma, pa = batch_inputs(base, bank, [row])
        alone = forward_hidden(base, xa, ma, pa)[0]
        n = len(row[2])
        torch.testing.assert_close(together[b, :n], alone[:n], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_deep_composition_is_a_set_in_training_too(base):
    """All cells share position 0 and keys carry their own rotation: cell order does not change the output."""
    bank = random_deep(base)
    ab = batch_inputs(base, bank, [(None, ("alcohol", "gambling"), [5, 6, 7])])
    ba = batch_inputs(base, bank, [(None, ("gambling", "alcohol"), [5, 6, 7])])
    torch.testing.assert_close(forward_hidden(base, *ab), forward_hidden(base, *ba), rtol=1e-4, atol=1e-4)
    none = batch_inputs(base, bank, [(None, (), [5, 6, 7])])
    assert (forward_hidden(base, *ab) - forward_hidden(base, *none)).abs().max() > 1e-2  # the cells act


def test_gradients_reach_keys_and_values_of_every_layer(base):
    bank = random_deep(base)
    x, mask, prefix = batch_inputs(base, bank, [("positive", ("alcohol",), [5, 6, 7])])
    forward_hidden(base, x, mask, prefix)[0, -1].pow(2).sum().backward()
    for t in (bank.keys["alcohol"], bank.values["alcohol"], bank.keys["positive"], bank.values["positive"]):
        assert t.grad is not None and all(t.grad[:, layer].abs().sum() > 0 for layer in range(N_LAYER))
    assert bank.keys["gambling"].grad is None  # not in the composition
    assert not bank.bos_keys.requires_grad


def test_deep_lr_is_per_tensor_scaled_by_its_std(base):
    bank = random_deep(base)
    with torch.no_grad():
        bank.values["alcohol"].mul_(10)
    groups = param_groups(bank, TrainConfig(kind="deep"))
    assert len(groups) == 6
    scale = {id(g["params"][0]): g["scale"] for g in groups}
    assert scale[id(bank.values["alcohol"])] == pytest.approx(float(bank.values["alcohol"].std()))
    assert scale[id(bank.values["alcohol"])] > 5 * scale[id(bank.keys["alcohol"])]


def test_config_kind_is_checked():
    from edge_safe.convert.errors import EdgeSafeError

    assert TrainConfig().kind == "shallow"
    with pytest.raises(EdgeSafeError, match="kind must be 'shallow' or 'deep', got 'middle'"):
        TrainConfig(kind="middle")


def test_deep_training_runs_and_exports_a_deep_bank(base, cfg, tmp_path):
    cfg = cfg.replace(kind="deep", steps=6, val_every=3, lr=0.3)
    bank, summary = train(cfg, base, tmp_path / "run", progress=False)
    assert isinstance(bank, DeepBank) and bank.names == ["positive", "rejective", "negative", *cfg.constraints]
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and "val" in log[2] and np.isfinite([r["loss"] for r in log]).all()
    tb = export_bank(bank, base, cfg, summary)
    path = tb.save(tmp_path / "deep.gguf")
    back = TokenBank.load(path)
    assert back.deep_geometry == (N_LAYER, WIDTH, WIDTH) and all(t.is_deep for t in back.tokens.values())
    assert back.tokens["alcohol"].keys.shape == (2, N_LAYER, WIDTH) and back.tokens["positive"].n_vectors == 1
    # validation of an exported deep bank goes through the same forward
    again = trainable_bank(base, back)
    np.testing.assert_array_equal(again.keys["alcohol"].detach().numpy(), back.tokens["alcohol"].keys)
    # resume from the checkpoint: same config, more steps
    bank2, _ = train(cfg.replace(steps=7), base, tmp_path / "run", resume=True, progress=False)
    assert isinstance(bank2, DeepBank)


def test_init_deep_from_a_shallow_bank_is_the_kv_its_vectors_produce(base, cfg, tmp_path):
    shallow_cfg = cfg.replace(steps=1, val_every=1)
    shallow, summary = train(shallow_cfg, base, tmp_path / "s", progress=False)
    path = export_bank(shallow, base, shallow_cfg, summary).save(tmp_path / "shallow.gguf")
    deep = init_deep(base, cfg.replace(kind="deep", init_bank=str(path)), torch.Generator())
    k, v = kv_of_inputs(base, shallow.vectors["alcohol"].detach())
    torch.testing.assert_close(deep.keys["alcohol"].detach(), k)
    torch.testing.assert_close(deep.values["alcohol"].detach(), v)
    # and a deep init_bank is taken as it is
    deep_path = export_bank(deep, base, cfg.replace(kind="deep"), {}).save(tmp_path / "deep.gguf")
    again = init_deep(base, cfg.replace(kind="deep", init_bank=str(deep_path)), torch.Generator())
    torch.testing.assert_close(again.keys["gambling"].detach(), deep.keys["gambling"].detach())
    from edge_safe.convert.errors import EdgeSafeError

    with pytest.raises(EdgeSafeError, match="'alcohol' has 2 positions, the config needs 3"):
        init_deep(base, cfg.replace(kind="deep", init_bank=str(path), n_vectors=3), torch.Generator())


# ---------------------------------------------------------------- control tokens after a context


@torch.no_grad()
def test_a_context_before_an_empty_prefix_is_the_plain_sequence(base):
    """[BOS][context] in the cache and the request after it at positions L+1..: the plain forward of the whole
    sequence (the context's K/V and the request's positions are where the runtime has them)."""
    bank = random_deep(base)
    ctx, ids = (20, 21, 22, 23, 24), [5, 6, 7]
    x, mask, prefix = batch_inputs(base, bank, [(None, (), ids, ctx)])
    assert prefix.offsets.tolist() == [5] and prefix.mask.tolist() == [[1] * 6]
    deep = forward_hidden(base, x, mask, prefix)[0]
    plain = base.model.model(input_ids=torch.tensor([[base.bos_id, *ctx, *ids]])).last_hidden_state[0, 6:]
    torch.testing.assert_close(deep, plain, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_cells_after_a_context_sit_at_its_last_position_with_keys_rotated_there(base):
    """The cells after a context of L tokens are the bank's rows with keys moved by L (where the runtime
    writes them), and the request follows at L+1..: built here by hand from the plain parts."""
    from edge_safe.training import objective

    bank = random_deep(base)
    ctx, ids = (30, 31, 32), [8, 9]
    x, mask, prefix = batch_inputs(base, bank, [("positive", ("alcohol",), ids, ctx)])
    got = forward_hidden(base, x, mask, prefix)[0]
    ck, cv = kv_of_inputs(base, base.embed(torch.tensor(ctx)), before_prompt=False)
    k, v = bank.cells(("positive", "alcohol"))
    k = objective.rotate_keys(base, k, len(ctx))
    cache = objective._new_cache(base)
    for layer in range(N_LAYER):
        keys = torch.cat([bank.bos_keys[None, layer], ck[:, layer], k[:, layer]])[None, None]
        values = torch.cat([bank.bos_values[None, layer], cv[:, layer], v[:, layer]])[None, None]
        cache.update(keys, values, layer)
    want = base.model.model(inputs_embeds=base.embed(torch.tensor(ids))[None], position_ids=torch.tensor([[4, 5]]),
                            use_cache=True, **{objective._cache_kwarg(base): cache}).last_hidden_state[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # without the rotation the keys would sit at position 0: a different result
    x0, m0, p0 = batch_inputs(base, bank, [("positive", ("alcohol",), ids, ())])
    assert (forward_hidden(base, x0, m0, p0)[0] - got).abs().max() > 1e-3


@torch.no_grad()
def test_rows_with_contexts_of_different_lengths_do_not_change_each_other(base):
    bank = random_deep(base)
    rows = [("positive", ("alcohol",), [5, 6, 7], (40, 41, 42, 43)), (None, (), [8, 9], ()),
            ("positive", ("gambling", "alcohol"), [5, 6], (44,))]
    x, mask, prefix = batch_inputs(base, bank, rows)
    assert prefix.offsets.tolist() == [4, 0, 1]
    together = forward_hidden(base, x, mask, prefix)
    for b, row in enumerate(rows):
        xa, ma, pa = batch_inputs(base, bank, [row])
        n = len(row[2])
        torch.testing.assert_close(together[b, :n], forward_hidden(base, xa, ma, pa)[0, :n], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_contexts_longer_than_the_sliding_window_are_masked_by_true_position():
    """Past the sliding window (8 here, 512 in Gemma 3 270M), batched rows whose contexts differ in length each
    equal the plain forward of [BOS][context][request], where transformers masks by position itself: the
    sliding layer no longer sees the start of the context, whatever padding the shorter row carries."""
    narrow = tiny_random_model(sliding_window=8)
    bank = random_deep(narrow)
    rows = [(None, (), [5, 6, 7, 8], tuple(range(40, 60))), (None, (), [9, 10], tuple(range(60, 66)))]
    x, mask, prefix = batch_inputs(narrow, bank, rows)
    together = forward_hidden(narrow, x, mask, prefix)
    for b, (_, _, ids, ctx) in enumerate(rows):
        plain = narrow.model.model(input_ids=torch.tensor([[narrow.bos_id, *ctx, *ids]])).last_hidden_state[0]
        torch.testing.assert_close(together[b, : len(ids)], plain[1 + len(ctx):], rtol=1e-4, atol=1e-4)
    wide = tiny_random_model(sliding_window=512)  # same weights (same seed): the window is what differs
    ids, ctx = rows[0][2], rows[0][3]
    unmasked = wide.model.model(input_ids=torch.tensor([[wide.bos_id, *ctx, *ids]])).last_hidden_state[0, 21:]
    assert (unmasked - together[0, :4]).abs().max() > 1e-3


def test_gradients_reach_cells_written_after_a_context(base):
    bank = random_deep(base)
    x, mask, prefix = batch_inputs(base, bank, [("positive", ("alcohol",), [5, 6], (50, 51, 52))])
    forward_hidden(base, x, mask, prefix).sum().backward()
    assert bank.keys["alcohol"].grad is not None and bank.keys["alcohol"].grad.abs().sum() > 0
    assert bank.values["alcohol"].grad.abs().sum() > 0


def test_deep_training_with_contexts_lays_examples_out_after_them(base, cfg, tmp_path):
    """context_fraction: a pool is made (from the repo's own rows when no third-party data is asked for), the
    run trains and logs it; an init_bank without a new constraint starts that one from its rule."""
    cfg = cfg.replace(kind="deep", steps=4, val_every=4, lr=0.3, context_fraction=0.5, context_pool=6,
                      context_tokens=(20, 120))
    bank, summary = train(cfg, base, tmp_path / "run", progress=False)
    assert sum(summary["contexts"].values()) > 0 and set(summary["contexts"]) <= {"turns", "pasted"}
    path = export_bank(bank, base, cfg, summary).save(tmp_path / "ctx.gguf")
    from edge_safe.convert.bank import TokenBank as TB

    TB.load(path).remove_token("privacy", drop_from_profiles=True).save(tmp_path / "no_privacy.gguf")
    fresh = init_deep(base, cfg.replace(init_bank=str(tmp_path / "no_privacy.gguf"), new_token_lr=3.0), torch.Generator())
    assert fresh.fresh == ["privacy"]
    groups = param_groups(fresh, cfg.replace(new_token_lr=3.0))
    scale = {id(g["params"][0]): g["scale"] for g in groups}
    assert scale[id(fresh.keys["privacy"])] == pytest.approx(float(fresh.keys["privacy"].std()) * 10, rel=1e-5)
    assert scale[id(fresh.keys["alcohol"])] == pytest.approx(float(fresh.keys["alcohol"].std()), rel=1e-5)


def test_frozen_tokens_stay_as_the_init_bank_has_them(base, cfg, tmp_path):
    """frozen: new constraints learn beside old ones kept exactly as they were."""
    first = cfg.replace(kind="deep", steps=1, val_every=1, lr=0.3)
    bank, summary = train(first, base, tmp_path / "a", progress=False)
    path = export_bank(bank, base, first, summary).save(tmp_path / "a.gguf")
    second = first.replace(init_bank=str(path), frozen=("alcohol", "positive"), steps=3, val_every=3)
    again, _ = train(second, base, tmp_path / "b", progress=False)
    torch.testing.assert_close(again.keys["alcohol"].detach(), bank.keys["alcohol"].detach())
    torch.testing.assert_close(again.values["positive"].detach(), bank.values["positive"].detach())
    assert (again.keys["gambling"].detach() - bank.keys["gambling"].detach()).abs().max() > 0
    from edge_safe.convert.errors import EdgeSafeError

    with pytest.raises(EdgeSafeError, match="without an init_bank"):
        TrainConfig(frozen=("alcohol",))


def test_a_batch_without_a_trainable_token_is_skipped(base, cfg, tmp_path, monkeypatch):
    """A step whose examples use frozen tokens only has nothing to train: it is skipped, the run goes on."""
    import dataclasses

    from edge_safe.training import sampler as sm

    first = cfg.replace(kind="deep", steps=1, val_every=1, lr=0.3)
    bank, summary = train(first, base, tmp_path / "a", progress=False)
    path = export_bank(bank, base, first, summary).save(tmp_path / "a.gguf")
    frozen = tuple(first.modes) + ("alcohol", "gambling")
    batch = sm.TaskSampler.batch
    monkeypatch.setattr(sm.TaskSampler, "batch", lambda self, step: [
        dataclasses.replace(ex, mode="positive", constraints=("alcohol",), refuse=None, order=1)
        for ex in batch(self, step)] if step == 0 else batch(self, step))
    still, _ = train(first.replace(init_bank=str(path), frozen=frozen, steps=2, val_every=2), base, tmp_path / "b",
                     progress=False)
    for name in frozen:
        torch.testing.assert_close(still.keys[name].detach(), bank.keys[name].detach())
    from edge_safe.convert.errors import EdgeSafeError

    with pytest.raises(EdgeSafeError, match="nothing to train"):
        first.replace(init_bank=str(path), frozen=tuple(first.modes) + tuple(first.constraints))


def test_a_step_is_decoded_in_parts_by_context_length():
    """Rows without a context go together; rows with one are sorted by its length and cut so that no part pads
    many rows to a long context; every example is in exactly one part, in the step's order within it."""
    from edge_safe.training.trainer import micro_batches

    lengths = [0, 2000, 0, 300, 300, 1500, 0, 100]
    parts = micro_batches(list(range(len(lengths))), lambda i: lengths[i], budget=1000)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    assert parts[0] == [0, 2, 6] and all(p == sorted(p) for p in parts)
    assert all(len(p) * max(lengths[i] for i in p) <= 1000 or len(p) == 1 for p in parts[1:])
    assert [3, 4, 7] in parts and [1] in parts and [5] in parts
    assert micro_batches([], lambda i: 0) == []


@torch.no_grad()
def test_cells_past_the_copies_position_are_laid_out_as_many_times_as_the_runtime_writes_them(base, cfg, tmp_path):
    """deep_copies: a row whose cells sit at or past the position gets them k times (the same hidden states as a
    bank holding every token's rows k times); a row before it is unchanged; the exported bank carries the rule."""
    bank = random_deep(base)
    doubled = DeepBank({n: (torch.cat([bank.keys[n]] * 2), torch.cat([bank.values[n]] * 2)) for n in bank.names},
                       (bank.bos_keys, bank.bos_values))
    bank.copies = ((3, 2),)
    late, early = ("positive", ("alcohol",), [5, 6, 7], (40, 41, 42, 43)), ("positive", ("alcohol",), [5, 6], (44,))
    for row, same_as in ((late, doubled), (early, random_deep(base))):
        x, m, p = batch_inputs(base, bank, [row])
        xo, mo, po = batch_inputs(base, same_as, [row])
        torch.testing.assert_close(forward_hidden(base, x, m, p), forward_hidden(base, xo, mo, po), rtol=1e-5, atol=1e-5)
    x, m, p = batch_inputs(base, bank, [late, early])  # batched: each row with its own count, padded
    assert int(p.mask[0].sum()) == 1 + 4 + 3 * 2 and int(p.mask[1].sum()) == 1 + 1 + 3
    with pytest.raises(Exception, match="deep copies must be"):
        cfg.replace(kind="deep", deep_copies=((0, 2),))
    run_cfg = cfg.replace(kind="deep", steps=1, val_every=1, deep_copies=((64, 2),))
    trained, summary = train(run_cfg, base, tmp_path / "run", progress=False)
    assert trained.copies == ((64, 2),)
    assert TokenBank.load(export_bank(trained, base, run_cfg, summary).save(tmp_path / "b.gguf")).deep_copies == ((64, 2),)


def test_anchor_examples_are_repo_rows_under_compositions_of_the_anchor_banks_constraints(cfg):
    """Anchor draws: a share of the examples, never a third-party row, compositions of the anchor bank's
    constraints from one up to all of them (past max_order); without an anchor bank no draw changes."""
    import random

    from edge_safe.training.sampler import Prompt, TaskSampler, load_prompts

    prompts = load_prompts(cfg.data_dir, "train")
    prompts += [Prompt(f"someone else's {c} request", c, "violating", "src/x", "third-party") for c in cfg.constraints]
    plain = [TaskSampler(prompts, cfg, random.Random(3)).batch(s) for s in range(4)]
    c = cfg.replace(anchor_bank="unused.gguf", anchor_fraction=0.3)
    assert [TaskSampler(prompts, c, random.Random(3)).batch(s) for s in range(4)] == plain  # names unset: no draw
    s = TaskSampler(prompts, c, random.Random(3))
    s.anchor_names = ("alcohol", "gambling", "privacy")
    anchored, sizes, n = 0, set(), 0
    for step in range(80):
        for ex in s.batch(step):
            n += 1
            if not ex.anchor:
                continue
            anchored += 1
            assert prompts[ex.prompt].slice != "third-party" and ex.refuse is None and ex.mode == "positive"
            assert set(ex.constraints) <= set(s.anchor_names) and ex.order == len(ex.constraints)
            sizes.add(len(ex.constraints))
    assert 0.2 < anchored / n < 0.4 and sizes == {1, 2, 3}  # 3 > max_order 2
    s = TaskSampler(prompts, c.replace(anchor_min_order=2), random.Random(3))
    s.anchor_names = ("alcohol", "gambling", "privacy")
    sizes = {len(ex.constraints) for step in range(80) for ex in s.batch(step) if ex.anchor}
    assert sizes == {2, 3}  # anchor_min_order: only the larger compositions are anchored
    from edge_safe.convert.errors import EdgeSafeError

    with pytest.raises(EdgeSafeError, match="anchor_min_order must be 1 to"):
        c.replace(anchor_min_order=0)


def test_anchor_loss_is_zero_where_the_bank_is_the_anchor_and_grows_as_it_moves(base, cfg, tmp_path):
    """The anchor bank's first reply is computed on the student's own layout: starting from the anchor bank itself
    the anchor KL is 0; after a step that moved the tokens it is not."""
    first = cfg.replace(kind="deep", steps=1, val_every=1, lr=0.3)
    bank, summary = train(first, base, tmp_path / "a", progress=False)
    path = export_bank(bank, base, first, summary).save(tmp_path / "a.gguf")
    second = first.replace(init_bank=str(path), anchor_bank=str(path), anchor_fraction=0.5, anchor_weight=2.0,
                           steps=3, val_every=3)
    moved, _ = train(second, base, tmp_path / "b", progress=False)
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [("anchor" in r) for r in log] == [True] * 3
    assert abs(log[0]["anchor"]) < 1e-4 and log[2]["anchor"] > 0
    assert (moved.keys["alcohol"].detach() - bank.keys["alcohol"].detach()).abs().max() > 0
    from edge_safe.convert.errors import EdgeSafeError

    with pytest.raises(EdgeSafeError, match="needs an anchor_bank"):
        TrainConfig(anchor_fraction=0.2)
    other = first.replace(constraints=("gambling",), max_order=1, held_out=())
    lone_bank, lone_summary = train(other, base, tmp_path / "c", progress=False)
    lone_path = export_bank(lone_bank, base, other, lone_summary).save(tmp_path / "gambling.gguf")
    with pytest.raises(EdgeSafeError, match="holds none of the trained constraints"):
        train(first.replace(constraints=("alcohol",), max_order=1, held_out=(), anchor_bank=str(lone_path), anchor_fraction=0.5), base,
              tmp_path / "d", progress=False)


def test_tokens_trained_for_the_decision_readout_keep_it_and_the_loss_follows_its_score(base, cfg, tmp_path):
    """readout_weight: the binary loss on init_bank's readout score; the readout is frozen and exported as is."""
    from edge_safe.convert.errors import EdgeSafeError
    from edge_safe.convert.readout import Readout

    first = cfg.replace(kind="deep", steps=1, val_every=1, lr=0.3)
    bank, summary = train(first, base, tmp_path / "a", progress=False)
    plain = export_bank(bank, base, first, summary)
    plain_path = plain.save(tmp_path / "plain.gguf")
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(base.model.config.vocab_size, 64, replace=False))
    plain.readout = Readout(ids, rng.standard_normal(64).astype(np.float32) * 0.1, -0.5, {"made": "test"})
    path = plain.save(tmp_path / "with_readout.gguf")

    second = first.replace(init_bank=str(path), readout_weight=2.0, steps=3, val_every=3)
    trained, summary2 = train(second, base, tmp_path / "b", progress=False)
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["readout"] > 0 for r in log) and np.isfinite([r["readout"] for r in log]).all()
    assert (trained.keys["alcohol"].detach() - bank.keys["alcohol"].detach()).abs().max() > 0
    back = TokenBank.load(export_bank(trained, base, second, summary2).save(tmp_path / "b.gguf"))
    assert back.readout is not None and back.readout.fit == {"made": "test"}
    np.testing.assert_array_equal(back.readout.ids, ids)
    np.testing.assert_array_equal(back.readout.weights, TokenBank.load(path).readout.weights)
    # validation decides by the readout's score: it differs from the opener margin's decisions
    from edge_safe.training.objective import ReadoutTerm
    from edge_safe.training.trainer import val_margins, validation_set

    cases, val_ids = validation_set(base, second, first_template(), 1)
    term = ReadoutTerm.of(back.readout, base.device)
    by_score = val_margins(base, trained, val_ids, cases[:8], 0, term)
    assert [round(m, 4) for m in by_score] != [round(m, 4) for m in val_margins(base, trained, val_ids, cases[:8], 0)]

    with pytest.raises(EdgeSafeError, match="needs a decision readout in init_bank"):
        train(first.replace(init_bank=str(plain_path), readout_weight=1.0), base, tmp_path / "c", progress=False)
    plain.readout = Readout(ids, np.zeros(128, np.float32), 0.0, {}, offsets=(0, 3))  # reads a row before it too
    rows_path = plain.save(tmp_path / "rows.gguf")
    with pytest.raises(EdgeSafeError, match=r"first reply token alone.*rows \[3\].*--offsets 0"):
        train(first.replace(init_bank=str(rows_path), readout_weight=1.0), base, tmp_path / "e", progress=False)
    with pytest.raises(EdgeSafeError, match="readout_weight must be >= 0"):
        TrainConfig(readout_weight=1.0)


def first_template():
    from edge_safe.training.trainer import QA_TEMPLATE

    return QA_TEMPLATE


def test_the_readout_loss_is_softplus_of_the_score_on_the_wrong_side():
    from types import SimpleNamespace

    from edge_safe.training.objective import ReadoutTerm, readout_loss

    logits = torch.zeros(3, 10)
    logits[0, 2], logits[1, 2], logits[2, 2] = 3.0, 3.0, -1.0
    term = ReadoutTerm(torch.tensor([2]), torch.tensor([1.0]), 0.5)  # score = logit 2 + 0.5
    batch = SimpleNamespace(first=torch.tensor([0, 1, 2]), targets=torch.tensor([7, 5, 7]),
                            refuses=torch.tensor([True, False, False]), anchors=None)
    got = readout_loss(logits, batch, term, refuse_id=5)
    sp = torch.nn.functional.softplus
    # a refusal scored 3.5 (small loss); an answer whose reference opens with the refusal token adds none;
    # an answer scored -0.5 (softplus(-0.5))
    torch.testing.assert_close(got, torch.stack([sp(torch.tensor(-3.5)), torch.tensor(0.0), sp(torch.tensor(-0.5))]))
