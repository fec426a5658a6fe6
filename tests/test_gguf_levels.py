"""GGUF-native levels: llama.cpp's block layouts bit for bit, a lossless GGUF file round trip,
llama-quantize's fallbacks and costs, and the search-space family."""

import os

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from planner.errors import BadSearchSpace
from planner.levels import importance as imp_
from planner.levels.formats import Rounding
from planner.levels.gguf_blocks import GGUF_FORMATS, encode_blocks
from planner.levels.gguf_levels import GGUFSpec, GGUFWeight, build_gguf, parse_gguf, quantize_gguf, stored_type
from planner.levels.grids import dequantize
from planner.levels.registry import BuildOptions


def problem(out=8, inp=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * 0.05
    X = torch.randn(2 * inp, inp, generator=g) * torch.logspace(-1, 1, inp)
    return W, 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("name", list(GGUF_FORMATS))
def test_blocks_decode_like_the_format(name):
    """gguf-py's dequantizer reads our blocks as exactly the values the format's fields encode."""
    W, H = problem()
    fmt = GGUF_FORMATS[name]
    for imp in (None, imp_.diag_importance(H)):
        q, p = imp_.rtn_format(W, fmt, fmt.values(), imp, search=imp is not None)
        blocks = encode_blocks(name, q, p)
        bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert blocks.shape == (W.shape[0], W.shape[1] // bs * ts)
        theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name]).reshape(W.shape)
        assert torch.equal(torch.from_numpy(theirs.copy()), dequantize(fmt, q, p.scale, p.mn, fmt.values()))


@pytest.mark.parametrize("rounding", [Rounding.MINMAX, Rounding.DIAG, Rounding.GPTQ])
def test_every_type_and_rounding_round_trips(rounding):
    W, H = problem(out=4)
    for name in GGUF_FORMATS:
        w = quantize_gguf(W, name, rounding, H)
        spec = GGUFSpec(name, rounding)
        assert w.gguf_type == name and w.nbytes == spec.nbytes(W.shape) == spec.stored_bits(W.shape) // 8
        back = GGUFWeight.from_tensors(load(save(w.to_tensors("u.l"))), "u.l")
        assert torch.equal(back.blocks, w.blocks) and torch.equal(back.dequantize(), w.dequantize())


def test_gguf_file_round_trip_is_bit_exact(tmp_path):
    W, H = problem(out=6)
    levels = {f"blk.0.t{i}.weight": quantize_gguf(W, name, Rounding.DIAG, H) for i, name in enumerate(GGUF_FORMATS)}
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for tname, w in levels.items():
        writer.add_tensor(tname, w.blocks.numpy(), raw_dtype=gguf.GGMLQuantizationType[w.gguf_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors:
        w = levels[t.name]
        assert t.tensor_type.name == w.gguf_type
        assert np.array_equal(np.asarray(t.data).reshape(w.blocks.shape), w.blocks.numpy())
        deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(W.shape)
        assert torch.equal(torch.from_numpy(deq.copy()), w.dequantize())


def test_ref_is_gguf_py_and_diag_is_no_worse():
    W, H = problem()
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        ref = quantize_gguf(W, name, Rounding.REF)
        assert np.array_equal(ref.blocks.numpy(), gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType[name]))
        d = imp_.diag_importance(H)
        assert (imp_.weighted_error(W, quantize_gguf(W, name, Rounding.DIAG, H).dequantize(), d)
                <= imp_.weighted_error(W, ref.dequantize(), d))


def test_weights_on_a_q4_1_grid_come_back_bit_for_bit():
    """The default model's weights are a dequantized Q4_1 file: a Q4_1 level must reproduce them."""
    W, H = problem(out=16, inp=576)
    on_grid = gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType.Q4_1)
    W = torch.from_numpy(gguf.quants.dequantize(on_grid, gguf.GGMLQuantizationType.Q4_1).copy())
    for rounding in (Rounding.REF, Rounding.MINMAX, Rounding.DIAG):
        w = quantize_gguf(W, "Q4_1", rounding, H)
        assert torch.equal(w.dequantize(), W), rounding


def test_fallbacks_and_costs_follow_llama_quantize():
    assert stored_type("Q4_K", 576) == "Q5_0" and stored_type("Q3_K", 576) == "Q4_0"
    assert stored_type("IQ4_XS", 576) == "IQ4_NL" and stored_type("IQ3_S", 1536) == "IQ3_S"
    assert stored_type("Q6_K", 576) == "Q8_0" and stored_type("Q4_K", 1536) == "Q4_K"
    with pytest.raises(ValueError):
        stored_type("Q4_0", 100)
    spec = GGUFSpec("Q3_K")
    assert spec.stored_bits((1536, 576)) == 1536 * 576 * 4.5 and spec.code_bits((1536, 576)) == 1536 * 576 * 4
    assert spec.stored_bits((576, 1536)) == 576 * 1536 * 3.4375 and spec.id == "gguf-q3_k-diag"
    W, H = problem(out=4, inp=96)
    w = quantize_gguf(W, "Q2_K", Rounding.GPTQ, H)
    assert w.gguf_type == "Q4_0" and w.nbytes == GGUFSpec("Q2_K", Rounding.GPTQ).nbytes((4, 96))
    # Q2_K, Q3_K and Q4_0 all store Q4_0 here: quantized once, written as separate tensors
    specs = parse_gguf({"method": "gguf", "types": ["Q2_K", "Q3_K", "Q4_0"], "rounding": "gptq"}, "at")
    built = build_gguf(W, H, specs, BuildOptions())
    tensors = load(save({k: v for s in specs for k, v in built[s.id].to_tensors(s.id).items()}))
    assert all(torch.equal(GGUFWeight.from_tensors(tensors, s.id).blocks, w.blocks) for s in specs)


def test_parse_family_and_errors():
    specs = parse_gguf({"method": "gguf", "types": ["q3_k", "Q4_0"], "rounding": ["diag", "gptq"]}, "at")
    assert [s.id for s in specs] == ["gguf-q3_k-diag", "gguf-q3_k-gptq", "gguf-q4_0-diag", "gguf-q4_0-gptq"]
    assert parse_gguf({"method": "gguf", "types": "Q8_0", "rounding": "ref"}, "at")[0].rounding is Rounding.REF
    for bad in ({"types": ["Q3_K"], "rounding": "ref"}, {"types": ["Q9_9"]}, {"types": []},
                {"types": ["IQ2_XXS"], "rounding": "diag"}, {"types": ["Q4_0"], "bits": 4}):
        with pytest.raises(BadSearchSpace):
            parse_gguf({"method": "gguf", **bad}, "at")


@pytest.mark.skipif(not os.environ.get("PLANNER_LIBGGML"), reason="llama.cpp's libggml-base: set PLANNER_LIBGGML")
def test_llama_quantizer_matches_its_reference_and_decodes():
    W, H = problem(out=4)
    ref = quantize_gguf(W, "Q4_0", Rounding.REF)
    w = quantize_gguf(W, "Q4_0", Rounding.LLAMA)            # no importance: llama.cpp's _ref quantizer
    assert np.array_equal(w.blocks.numpy(), ref.blocks.numpy())
    for name in ("Q2_K", "Q3_K", "Q4_K", "IQ4_XS", "IQ3_S", "IQ2_XS"):
        w = quantize_gguf(W, name, Rounding.LLAMA, H)
        rel = float((w.dequantize() - W).norm() / W.norm())
        assert w.gguf_type == name and rel < 0.6, (name, rel)


@pytest.mark.skipif(not (os.environ.get("PLANNER_LIBGGML") and os.environ.get("PLANNER_LIBLLAMA")),
                    reason="llama.cpp's libggml-base and libllama: set PLANNER_LIBGGML and PLANNER_LIBLLAMA")
def test_llama_levels_are_the_bytes_llama_quantize_writes(tmp_path):
    """Same weights, same importance matrix: a gguf-<type>-llama level is llama-quantize's tensor."""
    from planner.levels.llamacpp_lib import model_quantize
    from planner.model.load import _alias_gguf, load_model

    src = _alias_gguf("smollm2-135m")
    W = load_model("smollm2-135m").model.model.layers[0].mlp.down_proj.weight.detach()   # 1536 columns
    d = np.random.default_rng(0).uniform(0.1, 3, W.shape[1]).astype(np.float32)
    for ftype in ("Q2_K",):        # also checked by hand: Q4_K_M, IQ4_XS (each call requantizes the whole model)
        model_quantize(src, tmp_path / "m.gguf", ftype, {"blk.0.ffn_down.weight": d}, pure=True)
        t = next(t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors if t.name == "blk.0.ffn_down.weight")
        mine = quantize_gguf(W, t.tensor_type.name, Rounding.LLAMA, torch.diag(torch.from_numpy(2 * d)))
        assert np.array_equal(np.asarray(t.data).reshape(mine.blocks.shape), mine.blocks.numpy()), ftype
