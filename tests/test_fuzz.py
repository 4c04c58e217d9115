"""Fuzzing the two parsers that take untrusted input: the bank loader and the server's request parser.

- ``TokenBank.load`` on random bytes, on byte-level mutations of a valid bank and
  on structure-aware mutations (metadata values of the wrong type or content,
  missing keys, odd tensors) either returns a valid bank or raises an
  :class:`EdgeSafeError` naming the file: never another exception, never a crash.
- The server answers random JSON, mutated valid requests and raw bytes with 2xx
  or a 4xx in OpenAI's error shape: never a 5xx.

Hypothesis runs deadline-free with bounded example counts (a few seconds in all).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_safe.convert.bank import BankToken, TokenBank
from edge_safe.convert.errors import EdgeSafeError
from edge_safe.convert.gguf_file import parse_header
from edge_safe.runtime import EdgeSafe
from edge_safe.server import create_app
from edge_safe.server.schema import ServerSettings



def fuzz(n: int):
    """Bounded, deadline-free, reproducible: ``n`` examples."""
    return settings(max_examples=n, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- the bank loader ----------------------------------------------------------------------


def valid_bank() -> TokenBank:
    rng = np.random.default_rng(0)
    tokens = {n: BankToken(n, kind, rng.standard_normal((k, 4)).astype(np.float32), f"about {n}", "Sorry.", "No.")
              for n, kind, k in (("alcohol", "constraint", 2), ("privacy", "constraint", 1), ("rejective", "mode", 1))}
    return TokenBank("gemma3", 4, "ab" * 32, "base", tokens, {"minors": ["alcohol"]},
                     training_config={"lr": 0.01}, eval_summary={"defense": 1.0})


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory):
    return valid_bank().save(tmp_path_factory.mktemp("fuzz") / "valid.gguf")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "candidate.gguf"


def load_or_clear_error(path):
    """TokenBank.load must give a valid bank or an EdgeSafeError whose message names the file."""
    try:
        bank = TokenBank.load(path)
    except EdgeSafeError as e:
        message = str(e)
        assert str(path) in message and "\n" not in message, message
        return None
    bank.validate()
    return bank


@fuzz(300)
@given(data=st.binary(max_size=600), magic=st.sampled_from([b"", b"GGUF", b"GGUF\x03\x00\x00\x00"]))
def test_random_bytes_are_refused_clearly(target, data, magic):
    target.write_bytes(magic + data)
    assert load_or_clear_error(target) is None


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)


@fuzz(300)
@given(edits=edits, cut=st.one_of(st.none(), st.integers(0, 10**6)), insert=st.binary(max_size=8))
def test_byte_mutations_of_a_valid_bank(bank_file, target, edits, cut, insert):
    data = bytearray(bank_file.read_bytes())
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        at = cut % len(data)
        data[at:at] = insert
        if not insert:
            del data[at:]
    target.write_bytes(bytes(data))
    load_or_clear_error(target)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
typed_values = st.one_of(
    st.tuples(st.text(max_size=20), st.just(GGUFValueType.STRING), st.none()),
    st.tuples(json_values.map(json.dumps), st.just(GGUFValueType.STRING), st.none()),
    st.tuples(st.integers(0, 2**32 - 1), st.just(GGUFValueType.UINT32), st.none()),
    st.tuples(st.integers(-(2**31), -1), st.just(GGUFValueType.INT32), st.none()),
    st.tuples(st.floats(width=32, allow_nan=True), st.just(GGUFValueType.FLOAT32), st.none()),
    st.tuples(st.booleans(), st.just(GGUFValueType.BOOL), st.none()),
    st.tuples(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4), st.just(GGUFValueType.ARRAY),
              st.just(GGUFValueType.STRING)),
    st.tuples(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4), st.just(GGUFValueType.ARRAY),
              st.just(GGUFValueType.UINT32)),
)
tensor_edits = st.sampled_from(["none", "drop_row", "f16", "i32", "nan", "rename", "extra", "remove", "empty"])


def rewrite(src, dst, key_edits: dict, tensor_edit: str) -> None:
    """Re-write ``src`` with some metadata replaced (value, type, subtype) or removed (None), and one tensor edit."""
    header = parse_header(src.read_bytes(), keep_arrays=True)
    data = src.read_bytes()
    kv = {k: (v, header.types[k][0], header.types[k][1] if len(header.types[k]) > 1 else None)
          for k, v in header.kv.items()}
    for key, new in key_edits.items():
        kv.pop(key, None) if new is None else kv.__setitem__(key, new)
    tensors = {}
    for name, info in header.tensors.items():
        dtype = np.float32 if info.qtype == GGMLQuantizationType.F32 else np.float16
        tensors[name] = np.frombuffer(data, dtype, int(np.prod(info.shape)), info.offset).reshape(info.shape).copy()
    first = next(iter(tensors))
    if tensor_edit == "drop_row":
        tensors[first] = tensors[first][:-1]
    elif tensor_edit == "f16":
        tensors[first] = tensors[first].astype(np.float16)
    elif tensor_edit == "i32":
        tensors[first] = tensors[first].astype(np.int32)
    elif tensor_edit == "nan":
        tensors[first][0, 0] = np.nan
    elif tensor_edit == "rename":
        tensors["bank.renamed"] = tensors.pop(first)
    elif tensor_edit == "extra":
        tensors["token_embd.weight"] = np.ones((2, 4), np.float32)
    elif tensor_edit == "remove":
        del tensors[first]
    elif tensor_edit == "empty":
        tensors[first] = np.zeros((0, 4), np.float32)
    w = GGUFWriter(dst, "gemma3")
    w.kv_data[0].clear()  # exactly the (edited) metadata, general.architecture included or not
    for key, (value, vtype, sub) in kv.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def same_type(vtype: int, sub) -> st.SearchStrategy:
    """New values of a key's own GGUF type (a JSON string stays a string, with other JSON in it).
    Arrays get >= 1 item: GGUFWriter cannot write empty ones."""
    if vtype == GGUFValueType.STRING:
        return st.one_of(st.text(max_size=20), json_values.map(json.dumps)).map(lambda v: (v, vtype, None))
    if vtype == GGUFValueType.ARRAY and sub == GGUFValueType.STRING:
        names = st.sampled_from(["alcohol", "privacy", "rejective", "mode", "constraint"]) | st.text(max_size=8)
        return st.lists(names, min_size=1, max_size=4).map(lambda v: (v, vtype, sub))
    if vtype == GGUFValueType.ARRAY:
        return st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4).map(lambda v: (v, vtype, sub))
    return st.integers(0, 2**32 - 1).map(lambda v: (v, vtype, None))


@fuzz(250)
@given(data=st.data(), tensor_edit=tensor_edits)
def test_structured_mutations_of_a_valid_bank(bank_file, target, data, tensor_edit):
    header = parse_header(bank_file.read_bytes(), keep_arrays=True)
    keys = sorted(header.kv)
    edits = {}
    for _ in range(data.draw(st.integers(0, 3))):
        key = data.draw(st.sampled_from(keys + ["edge_safe.extra", "general.type.extra"]))
        kind = data.draw(st.sampled_from(["drop", "retype", "same"] if key in header.kv else ["retype"]))
        if kind == "same":
            vtype, *sub = header.types[key]
            edits[key] = data.draw(same_type(vtype, sub[0] if sub else None))
        else:
            edits[key] = None if kind == "drop" else data.draw(typed_values)
    rewrite(bank_file, target, edits, tensor_edit)
    bank = load_or_clear_error(target)
    if not edits and tensor_edit == "none":
        assert bank is not None  # the rewrite itself is faithful


@pytest.mark.parametrize("alignment", [(0, GGUFValueType.UINT32, None), (-64, GGUFValueType.INT32, None),
                                       (["a"], GGUFValueType.ARRAY, GGUFValueType.STRING),
                                       (1.5, GGUFValueType.FLOAT32, None)])
def test_a_bad_alignment_is_a_clear_error(bank_file, target, alignment):
    rewrite(bank_file, target, {"general.alignment": alignment}, "none")
    assert load_or_clear_error(target) is None


# --- the request parser --------------------------------------------------------------------


@pytest.fixture(scope="module")
def es():
    with EdgeSafe(n_ctx=256, n_batch=128, n_threads=1, seed=0) as es:  # the shipped bank, whatever it holds
        yield es


@pytest.fixture(scope="module")
def client(es):
    app = create_app(es, ServerSettings(max_tokens_limit=1, max_body_bytes=4096))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def names(es) -> st.SearchStrategy:
    known = es.tokens[:2] + list(es.profiles)[:2] + es.modes
    return st.sampled_from(known + ["", "nope", " , ", "negative", "minors,eu,kiosk"])


def requests(es, path: str) -> st.SearchStrategy:
    """A request that is valid-ish field by field, with up to two fields replaced by arbitrary JSON."""
    text = st.text(st.characters(codec="utf-8"), max_size=30)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "system", "assistant"]),
                                     "content": text | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                       "text": text}), max_size=2)})
    main = {"messages": st.lists(message, min_size=1, max_size=3)} if path.endswith("chat/completions") \
        else {"prompt": text | st.lists(text, min_size=1, max_size=1)}
    fields = {
        "tokens": st.none() | names(es) | st.lists(names(es), max_size=3),
        "mode": st.none() | st.sampled_from(es.modes + ["", "nope", "negative"]),
        "max_tokens": st.integers(1, 2),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "stop": text | st.lists(text, max_size=4),
        "seed": st.integers(0, 2**70),
        "stream": st.booleans(),
        "model": text,
        "user": text,
    }
    junk_keys = st.sampled_from(sorted(fields) + ["messages", "prompt", "n", "logprobs", "stream_options",
                                                  "max_completion_tokens", "echo", "tools"])
    junk = st.dictionaries(junk_keys, json_values, max_size=2)
    return st.tuples(st.fixed_dictionaries(main, optional=fields), junk).map(lambda bj: {**bj[0], **bj[1]})


def check_reply(r) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, r.text
    else:
        assert r.json()["edge_safe"]["tokens"] is not None


@fuzz(120)
@given(data=st.data())
def test_request_bodies_never_give_a_5xx(es, client, data):
    path = data.draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    body = data.draw(requests(es, path))
    check_reply(client.post(path, content=json.dumps(body)))  # NaN/Infinity included: not JSON, so a 400


@fuzz(150)
@given(body=json_values)
def test_any_json_value_is_a_4xx(client, body):
    r = client.post("/v1/chat/completions", content=json.dumps(body))
    assert 400 <= r.status_code < 500
    check_reply(r)


@fuzz(150)
@given(raw=st.binary(max_size=200), path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/x"]))
def test_raw_bytes_are_a_4xx(client, raw, path):
    r = client.post(path, content=raw)
    assert 400 <= r.status_code < 500
    check_reply(r)
