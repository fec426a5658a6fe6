"""Shared fixtures: a tiny random Llama built in code (with an offline tokenizer), a tiny search
space, a small local text file, and a private `$PLANNER_CACHE` so no test touches the user's cache.

The tiny model: hidden 64, intermediate 128, 2 layers, 4 heads / 2 KV heads, a 384-token
byte-level BPE vocabulary, tied embeddings. With group size 48 every linear has a ragged last
group (64 = 48 + 16 columns, 128 = 48 + 48 + 32 columns).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

TINY_GROUP = 48
TINY_BITS = (2, 3, 4, 8)
TINY_SPACE_YAML = f"""\
name: tiny
description: GPTQ and RTN at 2, 3, 4, 8 bits, group size 48 (ragged last groups on the tiny model)
units: linear
levels:
  - method: gptq
    bits: [{", ".join(map(str, TINY_BITS))}]
    group_size: {TINY_GROUP}
  - method: rtn
    bits: [{", ".join(map(str, TINY_BITS))}]
    group_size: {TINY_GROUP}
gptq:
  damp: 0.01
  block_size: 32
"""
# small but enough windows for calibration, held-out and a search pool at seqlen 64
TINY_TEXT_CHARS = 60_000
TINY_SEQLEN, TINY_CALIB_TOKENS, TINY_EVAL_TOKENS = 64, 512, 256


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with `n` torch threads (the machine's 2 cores are shared), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The CLI sets torch's thread count globally; never let one test change the next one's."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("planner-cache")


@pytest.fixture(autouse=True)
def planner_cache(session_cache_dir, monkeypatch) -> Path:
    """Every test sees a private `$PLANNER_CACHE` (shared within the session: levels DBs are keyed
    by content, so sharing only saves time). Tests that need an empty cache make their own."""
    monkeypatch.setenv("PLANNER_CACHE", str(session_cache_dir))
    return session_cache_dir


@contextlib.contextmanager
def cache_env(path: Path):
    """`$PLANNER_CACHE` for fixtures wider than one test (function-scoped monkeypatch cannot serve them)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLANNER_CACHE", str(path))
        yield


def pydoc_text() -> str:
    from planner.data.corpus import builtin_text

    return builtin_text()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved random LlamaForCausalLM + PreTrainedTokenizerFast that load offline by folder path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([pydoc_text()[:20_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(out)

    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    with torch_threads(1):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pydoc.txt"
    path.write_text(pydoc_text()[:TINY_TEXT_CHARS], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_space_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spaces") / "tiny.yaml"
    path.write_text(TINY_SPACE_YAML)
    return path


@pytest.fixture(scope="session")
def tiny_model_data(tiny_model_dir, tiny_text_file):
    """`ModelData` of the tiny model on the small text file (fp32; tests change dtype with replace())."""
    from planner.pipeline import ModelData

    return ModelData(model=str(tiny_model_dir), dataset=str(tiny_text_file), seqlen=TINY_SEQLEN,
                     calib_tokens=TINY_CALIB_TOKENS, eval_tokens=TINY_EVAL_TOKENS, seed=0, dtype="fp32")


@pytest.fixture(scope="session")
def tiny_sessions(tiny_model_data, tiny_space_file, session_cache_dir):
    """`get(dtype)` -> a prepared pipeline Session of the tiny model (one per dtype, built once).

    A session's evaluator converts its model to the evaluation dtype in place, so each dtype gets
    its own session (and its own copy of the model)."""
    import dataclasses

    from planner.pipeline import prepare
    from planner.space import load_space

    sessions = {}

    def get(dtype: str = "fp32"):
        if dtype not in sessions:
            with cache_env(session_cache_dir), torch_threads(1):
                sessions[dtype] = prepare(dataclasses.replace(tiny_model_data, dtype=dtype),
                                          load_space(str(tiny_space_file)), quiet=True)
        return sessions[dtype]

    return get
