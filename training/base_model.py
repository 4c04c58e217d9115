"""The frozen base model for training: the runtime's own GGUF, loaded with transformers.

transformers dequantizes the Q4_K_M GGUF to fp32 (≈ 268 M parameters), which
takes a minute or two; the result is cached once as safetensors under the
user cache, keyed by the GGUF's token_embd fingerprint, so later runs start
in seconds. Tokenization uses llama.cpp's own tokenizer (vocab-only load), so
training and runtime see the very same token ids.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from edge_safe.convert.model import ModelInfo
from edge_safe.convert.model import cache_dir as cache_root

log = logging.getLogger(__name__)


@dataclass
class BaseModel:
    """A frozen causal LM plus the tokenizer and facts training needs."""

    model: torch.nn.Module
    tokenize: Callable[[str], list[int]]  # text -> ids, no BOS, no special-token parsing
    detokenize: Callable[[list[int]], str]
    bos_id: int
    eos_ids: frozenset[int]
    info: ModelInfo | None  # None for tiny random test models

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_embd(self) -> int:
        return self.model.config.hidden_size

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> input embeddings, scaled exactly as llama.cpp scales token inputs."""
        return self.model.get_input_embeddings()(ids.to(self.device))


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_gguf_model(model_path: Path, device: str = "cpu") -> BaseModel:
    """Load (and cache) the GGUF as a frozen fp32 transformers model."""
    from transformers import AutoModelForCausalLM

    info = ModelInfo.read(model_path)
    cached = cache_root() / "hf" / info.fingerprint[:16]
    if not (cached / "model.safetensors").exists():
        print(
            f"edge-safe: dequantizing {model_path.name} for training (once, about a minute); cache: {cached}",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.time()
        model = AutoModelForCausalLM.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
        )
        _save_dequantized(model, cached)
        log.info("dequantized in %.0f s", time.time() - t0)
    model = _load_dequantized(cached)
    from edge_safe.llama import VocabTokenizer

    tok = VocabTokenizer(model_path)
    return BaseModel(
        model=freeze(model).to(device),
        tokenize=tok.tokenize,
        detokenize=tok.detokenize,
        bos_id=tok.bos_id,
        eos_ids=tok.eos_ids,
        info=info,
    )


def tiny_random_model(vocab_size: int = 512, hidden_size: int = 64, seed: int = 0,
                      sliding_window: int = 512) -> BaseModel:
    """A tiny random-weight Gemma 3 with a byte-level tokenizer, for fast tests of the trainer (a narrow
    ``sliding_window`` tests what happens past the window with short sequences)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=sliding_window,  # 512 as the real model
        max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"],
        initializer_range=0.3,  # larger than the default 0.02 so a random model reacts to its inputs
    )
    model = freeze(Gemma3ForCausalLM(cfg))
    offset = 3  # 0 pad, 1 eos, 2 bos

    def tokenize(text: str) -> list[int]:
        return [offset + (b % (vocab_size - offset)) for b in text.encode("utf-8")]

    def detokenize(ids: list[int]) -> str:
        return bytes((i - offset) % 256 for i in ids if i >= offset).decode("utf-8", errors="replace")

    return BaseModel(model, tokenize, detokenize, bos_id=2, eos_ids=frozenset({1}), info=None)


def _save_dequantized(model: torch.nn.Module, target: Path) -> None:
    """transformers refuses to save a GGUF-loaded model; save config + weights ourselves, atomically."""
    from safetensors.torch import save_file

    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tied = "lm_head.weight"  # tied to embed_tokens; re-tied on load
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != tied}
    save_file(state, str(tmp / "model.safetensors"))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _load_dequantized(path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"cached model at {path} does not match its config; delete that folder and retry")
    model.tie_weights()
    return model
