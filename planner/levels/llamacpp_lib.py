"""llama.cpp's own libraries, when a build names them (nothing here is needed otherwise):

    $PLANNER_LIBGGML   libggml-base.so: `ggml_quantize(W, type, imatrix)` is ggml_quantize_chunk, the
                       quantizer llama-quantize calls for every tensor (the `llama` rounding of GGUF levels)
    $PLANNER_LIBLLAMA  libllama.so: `model_quantize(src, out, ftype, imatrix)` is llama_model_quantize,
                       all of llama-quantize (its per-tensor type recipe for a mix, fallbacks, quantizers)

Both come from one source build (see bench/bpw_frontier.py). Given the same importance matrix, a
`gguf-<type>-llama` level holds exactly the bytes llama_model_quantize writes for that tensor (tested).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import gguf
import numpy as np
import torch

# llama.h's llama_ftype values of the mixes llama-quantize names
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13,
          "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20,
          "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28,
          "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31}


def _block(name: str) -> tuple[int, int]:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]


@functools.cache
def libggml() -> ctypes.CDLL | None:
    """llama.cpp's libggml-base (``ggml_quantize_chunk``) from $PLANNER_LIBGGML, or None."""
    path = os.environ.get("PLANNER_LIBGGML")
    if not path:
        return None
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize(W: torch.Tensor, name: str, imatrix: torch.Tensor | None) -> np.ndarray:
    """llama.cpp's own quantization of W (rows of whole blocks) to `name`: blocks [out, row bytes]."""
    lib = libggml()
    if lib is None:
        raise RuntimeError("rounding 'llama' needs llama.cpp's libggml-base: set PLANNER_LIBGGML to its path")
    qtype = int(gguf.GGMLQuantizationType[name])
    src = np.ascontiguousarray(W.float().numpy())
    out, inp = src.shape
    bs, ts = _block(name)
    dst = np.zeros((out, inp // bs * ts), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix.float().numpy())
    lib.ggml_quantize_init(qtype)
    n = lib.ggml_quantize_chunk(qtype, src.ctypes.data, dst.ctypes.data, 0, out, inp,
                                None if im is None else im.ctypes.data)
    if n != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {dst.nbytes}")
    return dst


class _Imatrix(ctypes.Structure):          # llama.h's llama_model_imatrix_data
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.POINTER(ctypes.c_float)), ("size", ctypes.c_size_t)]


class _QuantizeParams(ctypes.Structure):   # llama.h's llama_model_quantize_params
    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int), ("output_tensor_type", ctypes.c_int),
                ("token_embedding_type", ctypes.c_int), ("allow_requantize", ctypes.c_bool),
                ("quantize_output_tensor", ctypes.c_bool), ("only_copy", ctypes.c_bool), ("pure", ctypes.c_bool),
                ("keep_split", ctypes.c_bool), ("dry_run", ctypes.c_bool), ("imatrix", ctypes.POINTER(_Imatrix)),
                ("kv_overrides", ctypes.c_void_p), ("tt_overrides", ctypes.c_void_p),
                ("prune_layers", ctypes.c_void_p), ("max_buf_size", ctypes.c_size_t)]


_QUIET = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *_: None)


@functools.cache
def libllama(path: str | None = None) -> ctypes.CDLL | None:
    """llama.cpp's libllama (``llama_model_quantize``) from `path` or $PLANNER_LIBLLAMA, or None."""
    path = path or os.environ.get("PLANNER_LIBLLAMA")
    if not path:
        return None
    lib = ctypes.CDLL(path)
    lib.llama_model_quantize_default_params.restype = _QuantizeParams
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_QuantizeParams)]
    lib.llama_model_quantize.restype = ctypes.c_uint32
    lib.llama_log_set(_QUIET, None)
    return lib


def model_quantize(src: str | Path, out: str | Path, ftype: str, imatrix: dict[str, np.ndarray] | None = None,
                   pure: bool = False, lib_path: str | None = None) -> None:
    """llama-quantize --allow-requantize [--imatrix] [--pure] SRC OUT FTYPE, in-process; `imatrix` maps
    GGUF tensor names to one importance per input column."""
    lib = libllama(lib_path)
    if lib is None:
        raise RuntimeError("llama.cpp's own mixes need libllama: set PLANNER_LIBLLAMA to its path")
    p = lib.llama_model_quantize_default_params()
    p.ftype, p.allow_requantize, p.pure, p.nthread = FTYPES[ftype], True, pure, 1
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (imatrix or {}).items()}
    table = (_Imatrix * (len(arrays) + 1))()
    for i, (name, d) in enumerate(arrays.items()):
        table[i] = _Imatrix(name.encode(), d.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), d.size)
    table[len(arrays)] = _Imatrix(None, None, 0)
    if arrays:
        p.imatrix = ctypes.cast(table, ctypes.POINTER(_Imatrix))
    if lib.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(p)) != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed for {src}")
