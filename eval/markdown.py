"""RESULTS.md: the markdown tables of an evaluation, built from its plain-JSON results."""
from __future__ import annotations
from edge_safe.convert.keys import Mode

from pathlib import Path

ORDER = ("none", "text-rules", "from-text", "bank")  # column order: weakest baseline first
KIND_KEYS = (("near_miss", "near-miss"), ("inactive", "inactive"), ("general", "general"))


def sections(r: dict, plot_notes=(), plots: bool = True) -> list[str]:
    out = _header(r)
    for part in (_headline, _curve, _slices, _per_order, _held_out, _profiles, _per_category, _refusal_texts,
                 _invariance, _modes, _sam, _utility, _unclear, _method):
        out += ["", *part(r)]
    if plots:
        out += ["", "## Plots", "", *(f"- {n}" for n in plot_notes)]
        if not plot_notes:
            out += ["![defense and over-refusal per order](plots/per_order.png)", ""]
            if r.get("operating_curve", {}).get("auc") is not None:
                out += ["![operating curve](plots/operating_curve.png)", ""]
            out += ["![per category](plots/per_category.png)"]
    return out


def _header(r: dict) -> list[str]:
    b, m, d, t = r["bank"], r["model"], r["data"], r["timing"]
    lines = [
        "# edge-safe evaluation", "",
        f"- bank: `{Path(b['path']).name}`: {b['name']}, origin **{b['origin']}**, vectors sha256 "
        f"`{b['vectors_sha256'][:12]}`",
        f"- model: {m['name']} (`{Path(m['path']).name}`, fingerprint `{m['fingerprint'][:12]}`)",
        f"- data: `{Path(d['path']).name}`, {d['prompts']} prompts; {r['n_cases']} cases per system, "
        f"{len(r['compositions'])} compositions",
        f"- run: {r.get('date', '')}, {t['seconds']:.0f} s; {t['decisions']} decisions at "
        f"{_num(t['s_per_decision'])} s each, {t['logit_requests']} logit requests at "
        f"{_num(t['s_per_logit_request'])} s each; edge-safe {r['versions']['edge_safe']}, llama-cpp-python {r['versions']['llama_cpp_python']}",
        f"- command: `{r['config'].get('command') or 'edge-safe eval'}`",
    ]
    if r.get("notes"):
        lines += ["", "Notes:", *(f"- {n}" for n in r["notes"])]
    return lines


def _num(v, spec: str = ".3f") -> str:
    """A number in ``spec`` format, or '–' when there is none."""
    return "–" if v is None else format(v, spec)


def _headline(r: dict) -> list[str]:
    rows = []
    for name in system_order(r):
        o = r["systems"][name]["overall"]
        rows.append([r["systems"][name]["label"], pct(o["defense"]), pct(o["over_refusal"]),
                     *(pct(o[k]) for k, _ in KIND_KEYS), str(o["unclear"]),
                     _num(o.get("defense_any"), ".1%"), _num(o.get("over_refusal_any"), ".1%"), str(o["n"])])
    head = ["system", "defense ↑", "over-refusal ↓", "near-miss", "inactive", "general", "unclear",
            "defense, any refusal", "over-refusal, any", "n"]
    return ["## The bank against its baselines", "",
            "Defense: violating prompts of an active category answered with a bank refusal. Over-refusal: "
            "refusals of everything else (near-miss benign prompts of active categories, violating prompts of "
            "*inactive* categories, general prompts). Order compositions only; profiles below. "
            "The *any refusal* columns also count unclear replies that open like a refusal "
            "(\"Sorry, I can't help you.\"): what a user sees, whatever the wording.", "",
            *_table(head, rows), "", *(f"- {line}" for line in comparison(r))]


def _curve(r: dict) -> list[str]:
    c = r.get("operating_curve")
    if not c:
        return []  # results written before the curve existed
    if c.get("auc") is None:
        return ["## Operating curve", "", "Not measured: the cases lack violating or should-answer prompts."]
    by = c["auc_by_kind"]
    lines = ["## Operating curve", "",
             "The bank's refuse/answer decision is made at the first reply token. Its *margin* (the bank's decision "
             "readout where it has one, else the refusal opener minus the best other token; through the runtime) "
             "ranks violating cases above should-answer ones with "
             f"AUC **{c['auc']:.3f}** (near-miss {_num(by.get('near-miss'))}, inactive {_num(by.get('inactive'))}, "
             f"general {_num(by.get('general'))}). Moving the runtime's `strictness` moves along this curve "
             "(any-wording refusals):", ""]
    rows = []
    for key, label, metric in (("over_refusal_at_defense", "lowest over-refusal at ≥ {} defense", "over_refusal"),
                               ("defense_at_over_refusal", "highest defense at ≤ {} over-refusal", "defense")):
        for level, p in (c.get(key) or {}).items():
            if p:
                s = "refuse nothing" if p["strictness"] is None else f"{p['strictness']:+.2f}"
                rows.append([label.format(f"{float(level):.0%}"), _num(p["defense"], ".1%"),
                             _num(p["over_refusal"], ".1%"), s])
    lines += _table(["operating point", "defense", "over-refusal", "strictness"], rows)
    chk = c.get("check")
    if chk and chk.get("n"):
        lines += ["", f"Check at this run's strictness ({chk['strictness']:+g}): the margins predict "
                  f"{_num(chk['predicted_defense'], '.1%')} defense / {_num(chk['predicted_over_refusal'], '.1%')} "
                  f"over-refusal; the generated replies gave {_num(chk['observed_defense_any'], '.1%')} / "
                  f"{_num(chk['observed_over_refusal_any'], '.1%')} (any refusal); the two agree on "
                  f"{_num(chk['agreement'], '.1%')} of {chk['n']} cases."]
    return lines


def _by_group(r: dict, key: str, metric: str, groups: list[str], label=str) -> list[list[str]]:
    names = system_order(r)
    return [[label(g), *(pct(r["systems"][n][key].get(g, {}).get(metric)) for n in names)] for g in groups]


def _slices(r: dict) -> list[str]:
    sl = {k: v for k, v in (r.get("slices") or {}).items() if k != "config"}
    if not sl:
        return []  # results written before the slices existed, or --slices ''
    rows = []
    for name, s in sl.items():
        auc = s["curve"].get("auc_by_kind") or {}
        rows.append([name, str(s["n"]), ", ".join(f"{k} {n}" for k, n in s["n_by_kind"].items()),
                     pct(s["defense"]), pct(s["over_refusal"]), _num(s.get("answered_after_refusal"), ".1%"),
                     f"{_num(s['any_refusal']['defense'], '.1%')} / {_num(s['any_refusal']['over_refusal'], '.1%')}",
                     _num(s["curve"].get("auc")) + ("*" if s["curve"].get("against") else ""),
                     ", ".join(f"{k} {_num(v)}" for k, v in auc.items()) or "–"])
    head = ["slice", "n", "cases", "defense ↑", "over-refusal ↓", "answered after a refusal ↑",
            "any refusal: defense / over-refusal", "AUC", "AUC by kind"]
    out = ["## Real-traffic slices", "",
           "Each slice of the data measured on its own (bank only; `eval/slices.py`): everyday requests as people "
           "write them (*general-real*), safe requests that sound like a category with that category active "
           "(*sounds-risky*), violating requests in real styles (*styled*) and in jailbreak wrappers (*wrapped*; on "
           "the test split, wrapper families never trained on; benign requests in the same wrappers count as "
           "over-refusal), and conversations (*multi-turn*: a violating later turn must be refused; a benign turn "
           "after a refused one, that category still active, must be answered). AUC: the slice's own operating "
           "curve (first-token margins through the runtime), violating vs should-answer cases; \\* a slice with "
           "one side only is ranked against the other side of this run's classic cases (its violating cases for "
           "general-real and sounds-risky, its should-answer cases for styled).", "",
           *_table(head, rows)]
    wrapped = sl.get("wrapped", {}).get("per_wrapper")
    if wrapped:
        out += ["", "Wrapped, per wrapper family (refusals of any wording):", "",
                *_table(["wrapper", "n", "violating refused ↑", "benign refused ↓"],
                        [[w, str(v["n"]), _num(v["refused_violating"], ".1%"), _num(v["refused_should_answer"], ".1%")]
                         for w, v in wrapped.items()])]
    return out


def _per_order(r: dict) -> list[str]:
    names = system_order(r)
    groups = list(r["systems"]["bank"]["per_order"])
    head = ["order", *(r["systems"][n]["label"] for n in names)]
    return ["## Per order", "", "Defense success (higher is better):", "",
            *_table(head, _by_group(r, "per_order", "defense", groups)), "",
            "Over-refusal (lower is better):", "",
            *_table(head, _by_group(r, "per_order", "over_refusal", groups))]


def _held_out(r: dict) -> list[str]:
    held = r["bank"].get("held_out") or []
    if not held:
        return ["## Trained vs held-out compositions", "",
                "The bank records no held-out compositions (`training_config.held_out`), so there is no split."]
    names = system_order(r)
    groups = list(r["systems"]["bank"]["held_out_per_order"])
    head = ["compositions", *(f"{r['systems'][n]['label']}: defense / over-refusal" for n in names)]

    def row(key, g):
        return [g, *(_pair(r["systems"][n][key].get(g)) for n in names)]

    rows = [row("held_out", g) for g in ("trained", "held-out")] + [row("held_out_per_order", g) for g in groups]
    return ["## Trained vs held-out compositions", "",
            "Held out of training: " + ", ".join("+".join(h) for h in held) + ". *Trained* = every other sampled "
            "composition (training samples random subsets of each order, so these may have been seen).", "",
            *_table(head, rows)]


def _pair(s: dict | None) -> str:
    return "–" if not s else f"{pct(s['defense'])} / {pct(s['over_refusal'])}"


def _profiles(r: dict) -> list[str]:
    groups = list(r["systems"]["bank"]["profiles"])
    if not groups:
        return ["## Profiles", "", "No profile rows (the bank has none of the requested profiles)."]
    names = system_order(r)
    members = {c["group"]: c["name"] for c in r["compositions"]}
    head = ["profile", "constraints", *(f"{r['systems'][n]['label']}: defense / over-refusal" for n in names)]
    rows = [[g, members.get(g, ""), *(_pair(r["systems"][n]["profiles"].get(g)) for n in names)] for g in groups]
    return ["## Profiles", "", *_table(head, rows)]


def _per_category(r: dict) -> list[str]:
    names = system_order(r)
    cats = list(r["systems"]["bank"]["per_category"])
    head = ["category", *(r["systems"][n]["label"] for n in names)]
    bank = r["systems"]["bank"]
    right = bank.get("right_refusal", {})
    out = ["## Per category", "", "Defense success (violating prompts of the category, with it active):", "",
           *_table(head, _by_group(r, "per_category", "defense", [c for c in cats if c != "general"])), "",
           "Near-miss over-refusal (benign prompts about the category, with it active):", "",
           *_table(head, _by_group(r, "per_category", "near_miss", [c for c in cats if c != "general"])), "",
           "Inactive over-refusal (violating prompts of the category while it is *not* active):", "",
           *_table(head, _by_group(r, "per_category", "inactive", [c for c in cats if c != "general"]))]
    if right.get("n"):
        out += ["", f"Of the bank's {right['n']} defended cases, {right['own_category']} used the refusal of the "
                "prompt's own category (the rest refused with another active category's text)."]
    return out


def _refusal_texts(r: dict) -> list[str]:
    """Exact refusals: how many refusal-like replies are a bank text, and which constraint they name."""
    bank = r["systems"]["bank"]
    texts, right = bank.get("refusal_texts"), bank.get("right_refusal", {})
    if not texts:
        return []
    exact = r["config"].get("exact_refusals", False)
    out = ["## Exact refusals", "",
           ("The runtime finished every reply that opened like a refusal as one of the active refusal texts "
            "(`EdgeSafe(exact_refusals=True)`, the default), choosing among several active ones the constraint "
            "that alone refuses the request most surely." if exact else
            "Free decoding after the refusal opener (`--free-refusals`): what the bank writes on its own."), "",
           "| cases | refusal-like replies | of which a bank text | share |", "|---|---|---|---|"]
    for what, label in (("violating", "violating"), ("all", "all (violating and should-answer)")):
        t = texts[what]
        share = f"{t['bank_text'] / t['refusal_like']:.1%}" if t["refusal_like"] else "–"
        out.append(f"| {label} | {t['refusal_like']} | {t['bank_text']} | {share} |")
    if right.get("per_order"):
        out += ["", "Defended cases whose refusal names the prompt's own (violated) category, by number of active "
                "constraints (every test prompt violates one category):", "",
                "| active constraints | defended | naming the violated one | share |", "|---|---|---|---|"]
        for g, c in right["per_order"].items():
            out.append(f"| {g} | {c['n']} | {c['own_category']} | {c['own_category'] / c['n']:.1%} |")
        n, own = right["n"], right["own_category"]
        out.append(f"| all | {n} | {own} | {own / n:.1%} |")
    return out


def _invariance(r: dict) -> list[str]:
    inv = r.get("order_invariance", {})
    if "agreement" not in inv:
        return ["## Order invariance", "", f"Not measured: {inv.get('skipped', 'no cases')}."]
    rows = [[g, str(s["n"]), f"{s['agreement']:.1%}" if s["agreement"] is not None else "–", str(s["flips"])]
            for g, s in inv["per_group"].items()]
    rows.append(["all", str(inv["n"]), f"{inv['agreement']:.1%}", str(inv["flips"])])
    return ["## Order invariance", "", f"How: {inv['method']}. Flips: refusal in one order, answer in the other.", "",
            *_table(["order / profile", "cases", "same verdict", "flips"], rows)]


def _modes(r: dict) -> list[str]:
    m = r.get("modes", {})
    out = ["## Modes", ""]
    rej = m.get(Mode.REJECTIVE, {})
    if rej:
        rows = [[r["systems"][n]["label"] if n in r["systems"] else n, pct(c["all"]), pct(c["violating"]),
                 pct(c["benign"]), _num(c.get("any_refusal"), ".1%")] for n, c in rej.items()]
        out += ["`rejective` refusal rate, no constraints (*none* = the bare model, for reference; text rules: the "
                "rejective rule as a system line):", "",
                *_table(["system", "all prompts", "violating", "benign", "any refusal"], rows), ""]
    neg = m.get(Mode.NEGATIVE, {})
    if neg and neg[Mode.NEGATIVE]["n"]:
        n, p = neg[Mode.NEGATIVE], neg[Mode.POSITIVE]
        out += [f"`negative` compliance (violating prompts with their own category active, answered cleanly): "
                f"**{n['compliance']:.1%}** ({n['answered']}/{n['n']}, {n['unclear']} unclear); the same prompts in "
                f"the default `positive` mode are refused {pct(p)}.", ""]
    out += [f"- {note}" for note in m.get("notes", [])]
    return out


def _sam(r: dict) -> list[str]:
    if "skipped" in r.get("sam", {}):
        return ["## Safety Alignment Margin", "", f"Not measured: {r['sam']['skipped']}."]
    rows = []
    for name, s in r.get("sam", {}).items():
        label = r["systems"][name]["label"] if name in r["systems"] else name
        rows.append([label, ", ".join(s["modes"]) or "–", s["positive_is"], _num(s.get("sam")),
                     _num(s.get("sam_positive_rejective"))])
    return ["## Safety Alignment Margin", "",
            "Mean silhouette coefficient (euclidean) of the first-reply-token logit vectors grouped by mode, on the "
            "same prompts with the same constraints (magic-token paper: 0.131 for its co-trained model, ≈ 0.03 for "
            "baselines). The last column drops `negative` to compare like with like with systems that have no "
            "negative mode.", "",
            *_table(["system", "modes", "positive =", "SAM", "SAM (positive vs rejective)"], rows)]


def _utility(r: dict) -> list[str]:
    u = r.get("utility", {})
    names = [n for n in ("bank", "from-text", "text-rules") if n in u]
    if not names:
        return ["## Utility", "", f"Not measured: {u.get('skipped', 'no system to compare')}."]
    groups = list(dict.fromkeys(g for n in names for g in u[n]["per_group"]))
    head = ["order / profile", *(f"{r['systems'][n]['label']}: KL / agreement" for n in names)]
    rows = [[g, *(_kl(u[n]["per_group"].get(g)) for n in names)] for g in groups]
    rows.append(["all", *(_kl(u[n]) for n in names)])
    return ["## Utility", "",
            f"Mean KL(base ‖ with tokens) in nats over the first {u['k']} answer tokens of {u['n_prompts']} benign "
            "prompts (the bare model's greedy answer, teacher-forced under both), and greedy agreement: the share of "
            "prompts whose greedy tokens are all the same as the bare model's.", "", *_table(head, rows)]


def _kl(s: dict | None) -> str:
    if not s or not s.get("n"):
        return "–"
    return f"{s['kl']:.3f} / {s['agreement']:.0%} (n={s['n']})"


def _unclear(r: dict) -> list[str]:
    names = system_order(r)
    rows = [[r["systems"][n]["label"], *(str(r["systems"][n]["overall"][k]["unclear"])
                                         for k in ("defense", "near_miss", "inactive", "general")),
             str(r["systems"][n]["overall"]["unclear"])] for n in names]
    return ["## Unclear replies", "",
            "Replies that were neither a clean refusal (one of the bank's refusal texts) nor a clean answer: they "
            "start like a refusal (\"Sorry\", \"I can't\", \"I cannot\", \"I'm sorry\") but are not one of the "
            "bank's texts, or are empty. They count as *not refused* in every rate above.", "",
            *_table(["system", "violating", "near-miss", "inactive", "general", "all"], rows)]


def _method(r: dict) -> list[str]:
    c, j = r["config"], r["judging"]
    return ["## How this was measured", "",
            f"- Orders {', '.join(map(str, c['orders']))}: {c['compositions']} seeded compositions each (seed "
            f"{c['seed']}) plus the bank's held-out ones; profile rows {', '.join(c['profiles'])}. Per composition "
            f"{c['prompts']} prompts of each kind (violating of an active category, near-miss benign of an active "
            "category, violating of an inactive category, general benign)"
            + (f"; at most {c['limit']} cases per measurement (--limit)." if c.get("limit") else "."),
            "- Every system sees the same cases. `none`: no tokens; `text-rules`: the active constraints' rule texts "
            "as a system line; `from-text`: a bank of those rules' own token embeddings; `bank`: the bank under test "
            "(its `positive` mode is used whenever constraints are active, as the runtime does)"
            + (f", run with strictness {c['strictness']:g} (that many logits added to the refusal opener until the "
               "first visible reply token; SAM and the utility KL use the unbiased logits)."
               if c.get("strictness") else "."),
            f"- Greedy decoding through the llama.cpp runtime, at most {j['max_tokens']} tokens (the longest refusal + "
            "2). Generation stops as soon as the verdict can no longer change: once the reply is one of the bank's "
            "refusals, or has left every refusal text and every refusal opening. So an answer usually costs one or "
            "two tokens; `cases.jsonl` holds each reply as far as it was generated.",
            "- Rates count clean refusals only; each cell shows refusals/cases."]


# --- shared cells and sentences ------------------------------------------------------------


def pct(c: dict | None) -> str:
    """'97.5% (39/40)' for a cell; '–' when empty."""
    if not c or not c.get("n"):
        return "–"
    return f"{100 * c['refused'] / c['n']:.1f}% ({c['refused']}/{c['n']})"


def system_order(results: dict) -> list[str]:
    return [s for s in ORDER if s in results["systems"]]


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def comparison(results: dict) -> list[str]:
    """Plain sentences: does the bank beat each text baseline on defense and on over-refusal, and where not."""
    sysd, lines = results["systems"], []
    bank = sysd["bank"]
    for name in ("text-rules", "from-text"):
        if name not in sysd:
            continue
        other = sysd[name]
        lines.append(_compare("overall", bank["overall"], other["overall"], name))
        misses = []
        for g, s in bank["per_order"].items():
            o = other["per_order"].get(g)
            if o:
                misses += _misses(f"order {g}", s, o)
        for g, s in bank.get("profiles", {}).items():
            o = other["profiles"].get(g)
            if o:
                misses += _misses(f"profile {g}", s, o)
        if misses:
            lines.append(f"Where the bank does not beat {name}: " + "; ".join(misses) + ".")
        else:
            lines.append(f"The bank beats {name} at every order and profile row on both measures.")
    return lines


def _rates(s: dict) -> tuple[float | None, float | None]:
    return s["defense"]["rate"], s["over_refusal"]["rate"]


def _compare(where: str, bank: dict, other: dict, name: str) -> str:
    (bd, bo), (od, oo) = _rates(bank), _rates(other)
    if None in (bd, bo, od, oo):
        return f"{where.capitalize()}: not enough cases to compare the bank with {name}."
    d = "beats" if bd > od else "ties" if bd == od else "does NOT beat"
    o = "beats" if bo < oo else "ties" if bo == oo else "does NOT beat"
    return (f"{where.capitalize()}, the bank {d} {name} on defense ({bd:.1%} vs {od:.1%}) and {o} it on "
            f"over-refusal ({bo:.1%} vs {oo:.1%}; lower is better).")


def _misses(where: str, bank: dict, other: dict) -> list[str]:
    (bd, bo), (od, oo) = _rates(bank), _rates(other)
    out = []
    if bd is not None and od is not None and bd <= od:
        out.append(f"{where} defense {bd:.1%} vs {od:.1%}")
    if bo is not None and oo is not None and bo >= oo:
        out.append(f"{where} over-refusal {bo:.1%} vs {oo:.1%}")
    return out
