"""`edge-safe chat` and `edge-safe tokens`: exact output, errors, the REPL (CliRunner and a real pty)."""
from __future__ import annotations

import json
import os
import select
import sys
import time

import pytest
from click.testing import CliRunner

from edge_safe.cli import chat as cli_chat
from edge_safe.cli import cli
from edge_safe.llama import Context
from edge_safe.convert.bank import from_text_bank, from_text_token
from edge_safe.convert.model import ModelInfo
from edge_safe.runtime import EdgeSafe
from edge_safe.sampling import CHAT_MIN_P, CHAT_REPEAT_PENALTY, CHAT_TOP_K
from edge_safe.training.categories import CATEGORIES, MODES, PROFILES

pytestmark = pytest.mark.model
Q = "What is the capital of Peru?"
KNOWN = ("alcohol, gambling, drugs, sexual, horror, weapons, privacy, medical, finance, violence, selfharm, hate, crime, "
         "minors, eu, kiosk, core")


@pytest.fixture(scope="module")
def bank_path(model_path, tmp_path_factory):
    """A from-text bank like the one shipped before training: every category + the rejective mode."""
    info = ModelInfo.read(model_path)
    rejective = next(m for m in MODES if m.name == "rejective")
    with Context.load(model_path, n_ctx=64) as llm:
        toks = [from_text_token(info, llm.tokenize, c.name, c.rule, description=c.description, refusal=c.refusal)
                for c in CATEGORIES]
        toks.append(from_text_token(info, llm.tokenize, "rejective", rejective.rule, kind="mode",
                                    description=rejective.description, refusal=rejective.refusal))
    bank = from_text_bank(info, toks, {k: list(v) for k, v in PROFILES.items()})
    return bank.save(tmp_path_factory.mktemp("bank") / "bank.gguf")


@pytest.fixture(scope="module")
def shared(bank_path):
    with EdgeSafe(bank=bank_path, n_ctx=512) as es:
        yield es


@pytest.fixture
def patched(monkeypatch, shared):
    """chat with the shared model (no reload) and a terminal on stdin."""
    monkeypatch.setattr(cli_chat, "load_edge_safe", lambda **kw: shared)
    monkeypatch.setattr(cli_chat, "stdin_is_tty", lambda: True)
    return shared


@pytest.fixture
def loads(patched, monkeypatch) -> list[dict]:
    """The keywords the CLI builds the runtime with, one dict per load (it gets the shared one)."""
    seen = []
    monkeypatch.setattr(cli_chat, "load_edge_safe", lambda **kw: seen.append(kw) or patched)
    return seen


def record_requests(monkeypatch, es) -> list[tuple[list[dict], dict]]:
    """Record (messages, keywords) of every ``create_chat_completion`` the CLI makes, and answer them."""
    seen = []
    real = es.create_chat_completion

    def create_chat_completion(messages, **kw):
        seen.append((list(messages), kw))
        return real(messages, **kw)

    monkeypatch.setattr(es, "create_chat_completion", create_chat_completion)
    return seen


def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


# --- tokens ----------------------------------------------------------------------------


def test_tokens_lists_constraints_profiles_and_modes(bank_path):
    r = invoke("tokens", "--bank", str(bank_path))
    assert r.exit_code == 0, r.output
    assert r.stdout == (
        f"Bank: {bank_path} (edge-safe token bank (from text))\n"
        "\nConstraint tokens (--tokens NAME,...):\n"
        + "".join(f"  {c.name:<9}  {c.description}\n" for c in CATEGORIES)
        + "\nProfiles (--tokens NAME,...):\n"
        "  minors     alcohol, gambling, drugs, sexual, horror, weapons, violence, selfharm, hate\n"
        "  eu         privacy\n"
        "  kiosk      medical, finance\n"
        "  core       violence, selfharm, hate, crime\n"
        "\nModes (--mode NAME):\n"
        "  rejective  Refuse every request\n"
    )


def test_tokens_json(bank_path):
    data = json.loads(invoke("tokens", "--bank", str(bank_path), "--json").stdout)
    assert data["profiles"]["eu"] == ["privacy"]
    assert data["tokens"]["rejective"]["kind"] == "mode"
    assert list(data["tokens"])[:2] == ["alcohol", "gambling"]


def test_tokens_with_a_missing_bank_is_a_one_line_error(tmp_path):
    r = invoke("tokens", "--bank", str(tmp_path / "nope.gguf"))
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and str(tmp_path / "nope.gguf") in r.stderr


# --- one-shot chat ---------------------------------------------------------------------


def test_chat_answers_a_prompt_once(bank_path):
    r = invoke("chat", "--bank", str(bank_path), "--n-ctx", "256", "--tokens", "minors,eu", Q)
    # "Lima" or "Lima, Peru": the end of this reply is a near-tie that llama.cpp's kernels settle per CPU
    assert r.exit_code == 0 and r.stdout.startswith("Lima") and r.stdout.count("\n") == 1, r.output


def test_chat_reads_piped_stdin(patched, monkeypatch):
    monkeypatch.setattr(cli_chat, "stdin_is_tty", lambda: False)
    r = invoke("chat", input=Q + "\n")
    assert r.exit_code == 0 and r.stdout.startswith("Lima") and r.stdout.count("\n") == 1, r.output


def test_chat_json_is_openai_shaped(patched):
    r = invoke("chat", "--json", "--tokens", "eu", Q)
    data = json.loads(r.stdout)
    assert data["choices"][0]["message"]["content"].startswith("Lima")
    assert data["edge_safe"]["tokens"] == ["privacy"]


@pytest.mark.parametrize("args, error", [
    (["--tokens", "minor"], f"Error: unknown token or profile 'minor'; did you mean 'minors'? Known: {KNOWN}\n"),
    (["--mode", "rejectve"], "Error: unknown mode 'rejectve'; did you mean 'rejective'? Known: rejective\n"),
    (["--tokens", "rejective"], "Error: 'rejective' is a mode, not a constraint; select it with "
                                "mode='rejective' (CLI: --mode rejective)\n"),
])
def test_unknown_names_are_one_line_errors(patched, args, error):
    r = invoke("chat", *args, Q)
    assert (r.exit_code, r.stderr) == (1, error)


def test_strictness_flag_reaches_the_runtime_and_bad_values_fail_before_loading(patched, monkeypatch):
    r = invoke("chat", "--json", "--tokens", "eu", "--strictness", "20", Q)
    data = json.loads(r.stdout)
    assert data["edge_safe"]["strictness"] == 20.0
    assert data["choices"][0]["message"]["content"].startswith("Sorry")  # +20 logits on the opener: it refuses
    monkeypatch.setattr(cli_chat, "load_edge_safe", lambda **kw: pytest.fail("loaded the model for a bad flag"))
    r = invoke("chat", "--strictness", "inf", Q)
    assert r.exit_code == 1 and r.stderr.startswith("Error: strictness must be between -20 and 20")


def test_sampling_flags_reach_the_runtime_with_the_chat_defaults(patched, loads, monkeypatch):
    seen = record_requests(monkeypatch, patched)
    r = invoke("chat", "--json", "--model", "some/model.gguf", "--threads", "1", Q)
    assert r.exit_code == 0, r.output
    assert loads[-1]["model_path"] == "some/model.gguf" and loads[-1]["n_threads"] == 1
    assert loads[-1]["reread"] is True  # after earlier turns the last message is also read alone, by default
    (_, kw), = seen
    assert (kw["top_k"], kw["min_p"], kw["repeat_penalty"]) == (CHAT_TOP_K, CHAT_MIN_P, CHAT_REPEAT_PENALTY)
    assert (CHAT_TOP_K, CHAT_MIN_P, CHAT_REPEAT_PENALTY) == (40, 0.05, 1.1)
    assert (kw["temperature"], kw["top_p"], kw["max_tokens"], kw["strictness"]) == (0.0, 1.0, 256, 0.0)
    assert json.loads(r.stdout)["choices"][0]["message"]["content"].startswith("Lima")
    r = invoke("chat", "--json", "--top-k", "5", "--min-p", "0.2", "--repeat-penalty", "1.0", "--temperature", "0.7",
               "--seed", "3", Q)
    assert r.exit_code == 0, r.output
    kw = seen[-1][1]
    assert (kw["top_k"], kw["min_p"], kw["repeat_penalty"], kw["temperature"]) == (5, 0.2, 1.0, 0.7)
    assert loads[-1]["seed"] == 3
    r = invoke("chat", "--json", "--no-reread", Q)
    assert r.exit_code == 0, r.output
    assert loads[-1]["reread"] is False
    for flag, value in [("--repeat-penalty", "0"), ("--min-p", "1.5"), ("--top-k", "-1")]:
        r = invoke("chat", flag, value, Q)
        assert r.exit_code == 2 and flag in r.stderr, (flag, r.output)


def test_prompt_longer_than_the_context_is_a_clear_error(bank_path):
    r = invoke("chat", "--bank", str(bank_path), "--n-ctx", "32", "word " * 40)
    assert r.exit_code == 1
    assert r.stderr == ("Error: the prompt needs 46 positions (1 BOS + 0 control-token vectors + "
                        "45 prompt tokens) plus room to answer, but the context holds 32; pass a larger "
                        "--n-ctx (EdgeSafe(n_ctx=...)) or shorten the prompt or conversation\n")


def test_a_bank_for_another_model_says_which_field_and_what_to_pass(make_bank, tmp_path):
    path = make_bank(tmp_path, n_embd=640)  # right arch and width, another model's fingerprint
    r = invoke("chat", "--bank", str(path), Q)
    assert r.exit_code == 1
    assert "base model fingerprint expected 'abababababab…'" in r.stderr
    assert "pass --model <the model it was trained on: Tiny test model>" in r.stderr


def test_json_needs_a_prompt(patched):
    r = invoke("chat", "--json", input="")
    assert r.exit_code == 2 and "--json needs a PROMPT" in r.stderr


# --- the REPL ----------------------------------------------------------------------------


def test_repl_commands_history_and_exit(patched):
    lines = ["/help", "/tokens", "/tokens minors,eu", "/tokens nope", "/mode rejective", "/mode default",
             Q, "/reset", "/bogus", "/exit"]
    r = invoke("chat", input="\n".join(lines) + "\n")
    assert r.exit_code == 0, r.output
    reply = r.stdout.removeprefix("> " * 7).removesuffix("> " * 3)
    assert reply.startswith("Lima") and reply.endswith("\n") and reply.count("\n") == 1, r.stdout
    assert r.stderr == (
        "edge-safe chat (tokens: (none); mode: (none)). /help for commands, Ctrl-D to exit.\n"
        + cli_chat.REPL_HELP + "\n"
        "tokens: (none); mode: (none)\n"
        "available: alcohol, gambling, drugs, sexual, horror, weapons, privacy, medical, finance, "
        "violence, selfharm, hate, crime; profiles: minors, eu, kiosk, core\n"
        "tokens: alcohol, gambling, drugs, sexual, horror, weapons, privacy, violence, selfharm, hate; mode: (none)\n"
        f"error: unknown token or profile 'nope'. Known: {KNOWN}\n"
        "tokens: alcohol, gambling, drugs, sexual, horror, weapons, privacy, violence, selfharm, hate; mode: rejective\n"
        "tokens: alcohol, gambling, drugs, sexual, horror, weapons, privacy, violence, selfharm, hate; mode: (none)\n"
        "conversation cleared\n"
        "unknown command '/bogus'; /help lists the commands\n"
    )


def test_repl_strictness_command(patched):
    lines = ["/strictness", "/strictness 30", "/tokens eu", "/strictness 20", Q, "/reset", "/strictness 0", Q, "/exit"]
    r = invoke("chat", input="\n".join(lines) + "\n")
    assert r.exit_code == 0, r.output
    replies = [line.removeprefix("> ").lstrip("> ") for line in r.stdout.splitlines() if line.strip("> ")]
    assert len(replies) == 2 and replies[0].startswith("Sorry") and replies[1].startswith("Lima")
    assert "strictness: 0\nerror: strictness must be between -20 and 20" in r.stderr
    assert "strictness: 20\n" in r.stderr


def test_repl_keeps_the_conversation(patched, monkeypatch):
    requests = record_requests(monkeypatch, patched)
    r = invoke("chat", "--system", "Be brief.", input=f"{Q}\nAnd of France?\n")  # EOF exits
    assert r.exit_code == 0
    seen = [messages for messages, _ in requests]
    assert all(kw["stream"] is True for _, kw in requests)  # the REPL streams its replies
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][0]["content"] == "Be brief." and seen[1][1]["content"] == Q
    assert seen[1][2]["content"].startswith("Lima") and seen[1][3]["content"] == "And of France?"


def test_ctrl_c_stops_the_reply_not_the_program(patched, monkeypatch):
    seen = []
    real_chat = patched.create_chat_completion

    def chat(messages, **kw):
        seen.append(list(messages))
        if messages[-1]["content"] == "Tell me a story.":
            def interrupted():
                yield {"choices": [{"delta": {"role": "assistant"}}]}
                yield {"choices": [{"delta": {"content": "Once"}}]}
                raise KeyboardInterrupt
            return interrupted()
        return real_chat(messages, **kw)

    monkeypatch.setattr(patched, "create_chat_completion", chat)
    r = invoke("chat", input=f"Tell me a story.\n{Q}\n/exit\n")
    assert r.exit_code == 0
    assert r.stdout == "> Once\n> Lima\n> "
    assert "[stopped; this turn is not kept in the conversation]\n" in r.stderr
    assert seen[1] == [{"role": "user", "content": Q}]  # the interrupted turn was dropped


def test_repl_in_a_pseudo_terminal(bank_path):
    """The real thing: readline, streamed replies, Ctrl-C during a reply, Ctrl-D to leave."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # child: run the CLI on the terminal, with SIGINT as a shell gives it (exec keeps the
        # forking thread's signal mask and an ignored SIGINT; in CI's full run, after the bench and
        # engine tests, a Ctrl-C reached the child and was never acted on)
        import signal

        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-c", "from edge_safe.cli import main; main()",
                                  "chat", "--bank", str(bank_path), "--n-ctx", "1024", "--max-tokens", "600"])

    def read_until(marker: bytes, timeout: float = 60) -> bytes:
        buf, end = b"", time.time() + timeout
        while time.time() < end and marker not in buf:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
        return buf

    try:
        assert b"/help for commands" in read_until(b"> ")
        os.write(fd, b"/tokens minors,eu\n")
        assert b"tokens: alcohol, gambling" in read_until(b"> ")
        os.write(fd, Q.encode() + b"\n")
        assert b"Lima" in read_until(b"> ")
        os.write(fd, b"/tokens none\n")
        read_until(b"> ")
        os.write(fd, b"/reset\n")  # a fresh conversation: the long reply must not depend on the Lima turn
        read_until(b"> ")
        os.write(fd, b"Write the numbers from 1 to 500.\n")  # a long reply (hundreds of tokens)
        assert b"4" in read_until(b"4")  # streaming ("1 2 3 4" or "1, 2, 3, 4," by CPU); the echoed prompt has no 4
        os.write(fd, b"\x03")  # Ctrl-C while the reply streams
        assert b"[stopped" in read_until(b"> ")
        os.write(fd, b"\x04")  # Ctrl-D at the prompt
        read_until(b"\x00", timeout=10)
    finally:
        status = _reap(pid)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0


def _reap(pid: int, timeout: float = 20) -> int:
    """Wait for the child; kill it if it does not exit (a failed step must not hang the suite)."""
    end = time.time() + timeout
    while time.time() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.1)
    os.kill(pid, 9)
    return os.waitpid(pid, 0)[1]
