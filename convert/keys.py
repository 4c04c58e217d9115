"""Every GGUF key, tensor-name pattern and format constant of the token bank.

This module is the only place these strings appear (like gguf-py's
``constants.py``): the reader, the writer, the interchange converters and the
docs in ``FORMAT.md`` all refer to the names below. Bump :data:`FORMAT_VERSION`
on any change an older reader would misread.
"""
from __future__ import annotations

import re

#: Version of the ``edge_safe.*`` metadata layout written for banks of shallow tokens only
#: (so older readers keep reading them). A reader refuses versions above MAX_FORMAT_VERSION.
FORMAT_VERSION = 1
#: Written when a bank holds deep tokens (per-layer key/value rows): version-1 readers refuse it.
FORMAT_VERSION_DEEP = 2
MAX_FORMAT_VERSION = FORMAT_VERSION_DEEP


class Keys:
    """GGUF metadata keys, grouped like ``gguf.Keys``."""

    class General:
        ARCHITECTURE = "general.architecture"  # the base model's arch, e.g. "gemma3"
        TYPE = "general.type"  # "adapter" for a bank, "model" (or absent) for a model
        NAME = "general.name"
        DESCRIPTION = "general.description"  # optional: omitted when empty

    class Adapter:
        TYPE = "adapter.type"  # "token_bank" for a bank, "lora" for a LoRA

    class Bank:
        FORMAT_VERSION = "edge_safe.format_version"  # uint32
        N_EMBD = "edge_safe.n_embd"  # uint32
        BASE_FINGERPRINT = "edge_safe.base.fingerprint"  # sha256 hex of the base token_embd bytes
        BASE_NAME = "edge_safe.base.name"
        LAYOUT = "edge_safe.layout"
        CHAT_TEMPLATE = "edge_safe.chat_template"  # JSON (ChatTemplate.to_json)
        ORIGIN = "edge_safe.origin"
        PROFILES = "edge_safe.profiles"  # JSON object {profile: [token, ...]}
        TRAINING_CONFIG = "edge_safe.training_config"  # JSON object
        EVAL_SUMMARY = "edge_safe.eval_summary"  # JSON object
        # JSON object: the decision readout (convert/readout.py): token ids and weights read off the first reply
        # token's logits; absent = the runtime decides by the refusal-opener margin
        READOUT = "edge_safe.readout"
        MODE_BEHAVIOURS = "edge_safe.mode_behaviours"  # JSON object {mode: Behaviour}; absent = by name

    class Tokens:
        """Per-token metadata as parallel arrays, all in bank order."""

        NAMES = "edge_safe.tokens.names"  # [string]
        KINDS = "edge_safe.tokens.kinds"  # [string]
        N_VECTORS = "edge_safe.tokens.n_vectors"  # [uint32]
        # May hold empty strings, which GGUF string arrays cannot carry through
        # gguf-py safely, so each is one JSON-encoded list of strings.
        DESCRIPTIONS = "edge_safe.tokens.descriptions"
        REFUSALS = "edge_safe.tokens.refusals"
        RULES = "edge_safe.tokens.rules"
        ORIGINS = "edge_safe.tokens.origins"  # "" = the bank's origin
        DEPTHS = "edge_safe.tokens.depths"  # JSON list of Depth values; absent = all shallow

    class Deep:
        """Geometry of deep tokens, written when the bank has any: checked against the model."""

        N_LAYER = "edge_safe.deep.n_layer"  # uint32: layers (rows per position), model layer order
        N_EMBD_K = "edge_safe.deep.n_embd_k_gqa"  # uint32: width of one key row (n_head_kv x key_length)
        N_EMBD_V = "edge_safe.deep.n_embd_v_gqa"  # uint32: width of one value row
        POSITIONS = "edge_safe.deep.positions"  # string: where the cells sit (DEEP_POSITIONS)
        # JSON [[position, copies], ...] (ascending): cells that sit at or past `position` are written `copies`
        # times (identical rows at one position: each copy adds ln(copies) to their attention logits against a long
        # context before them). Optional: absent = written once everywhere.
        COPIES = "edge_safe.deep.copies"


class Model:
    """Keys and tensors read from a *base model* GGUF."""

    EMBEDDING_LENGTH = "{arch}.embedding_length"
    BLOCK_COUNT = "{arch}.block_count"
    HEAD_COUNT = "{arch}.attention.head_count"
    HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
    KEY_LENGTH = "{arch}.attention.key_length"
    VALUE_LENGTH = "{arch}.attention.value_length"
    ROPE_FREQ_BASE = "{arch}.rope.freq_base"
    SLIDING_WINDOW = "{arch}.attention.sliding_window"
    TOKEN_EMBD = "token_embd.weight"
    ALIGNMENT = "general.alignment"


#: general.type / adapter.type values that mark a token bank.
GENERAL_TYPE_ADAPTER = "adapter"
ADAPTER_TYPE_TOKEN_BANK = "token_bank"

#: One tensor per token: ``bank.<name>``, shape [n_vectors, n_embd] (numpy order).
TENSOR_PREFIX = "bank."
TENSOR_DTYPES = ("F32", "F16")
#: A deep token has two tensors instead: ``bank.<name>.k`` and ``bank.<name>.v``,
#: shape [n_positions, n_layer, n_embd_k_gqa / n_embd_v_gqa] (numpy order).
DEEP_SUFFIXES = (".k", ".v")

#: Where deep cells sit: every cell gets BOS's position 0, the conversation starts right
#: after BOS (and after any shallow vectors), so a composition is a set.
DEEP_POSITIONS = "bos/v1"
KNOWN_DEEP_POSITIONS = (DEEP_POSITIONS,)


def tensor_name(token: str) -> str:
    """GGUF tensor name of a (shallow) token's vectors."""
    return TENSOR_PREFIX + token


def deep_tensor_names(token: str) -> tuple[str, str]:
    """GGUF tensor names of a deep token's keys and values."""
    return tuple(TENSOR_PREFIX + token + s for s in DEEP_SUFFIXES)  # type: ignore[return-value]


class Depth:
    """Where a token acts: ``shallow`` = input vectors decoded after BOS; ``deep`` = key/value
    rows per layer written into the KV cache (no forward pass)."""

    SHALLOW = "shallow"
    DEEP = "deep"
    ALL = (SHALLOW, DEEP)


class Kind:
    """What a bank entry is: a composable constraint or an exclusive mode."""

    CONSTRAINT = "constraint"
    MODE = "mode"
    ALL = (CONSTRAINT, MODE)


class Mode:
    """The mode names the training recipe writes (magic-token co-training). What a mode *does* is the
    bank's :class:`Behaviour` for it (stored per bank; these names' defaults for older banks)."""

    POSITIVE = "positive"  # safe and helpful: refuses what the active constraints forbid
    REJECTIVE = "rejective"  # refuses everything
    NEGATIVE = "negative"  # unrestricted, for red-teaming
    ALL = (POSITIVE, REJECTIVE, NEGATIVE)


class Behaviour:
    """What the runtime does in a mode: ``constrained`` applies the active constraints (their refusals,
    ``strictness``), ``refuse_all`` finishes every reply as the mode's own refusal, ``unrestricted``
    guides nothing and is for red-teaming (the server allows it only when told to), ``unguided`` (a mode
    the bank says nothing about) guides nothing either: its vectors alone decide. A request with
    constraints and no mode gets the bank's first constrained mode."""

    CONSTRAINED = "constrained"
    REFUSE_ALL = "refuse_all"
    UNRESTRICTED = "unrestricted"
    UNGUIDED = "unguided"
    ALL = (CONSTRAINED, REFUSE_ALL, UNRESTRICTED, UNGUIDED)
    DEFAULTS = {Mode.POSITIVE: CONSTRAINED, Mode.REJECTIVE: REFUSE_ALL, Mode.NEGATIVE: UNRESTRICTED}


class Origin:
    """How the vectors were made; ``inspect`` shows it so a text baseline is never mistaken for training."""

    TRAINED = "trained"
    FROM_TEXT = "from-text"
    IMPORTED = "imported"
    ALL = (TRAINED, FROM_TEXT, IMPORTED)
    LABELS = {
        TRAINED: "trained",
        FROM_TEXT: "built from text rules, not trained",
        IMPORTED: "imported from another format",
    }


#: Token and profile names: lowercase slugs, the same in the CLI, GGUF, HTTP and logs.
#: Short enough that ``bank.<name>`` fits ggml's 64-byte tensor names.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
NAME_HINT = "lowercase letters, digits, '_' or '-', starting with a letter or digit, at most 48 characters"


class Interchange:
    """Names used by the plain-numpy and PyTorch interchange files."""

    NPZ_META = "__meta__"  # JSON string array in the .npz; every other array is a token
    TORCH_TOKENS = "state_dict"  # {name: tensor (n_vectors, n_embd)}; deep: {name.k, name.v: (n, n_layer, width)}
    TORCH_META = "metadata"  # same JSON object as NPZ_META
    FORMAT = "edge-safe-token-bank"  # meta["format"]
