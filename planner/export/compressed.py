"""compressed-tensors export (read by vLLM and llm-compressor), written through the library itself.

One `config_groups` entry per distinct scheme (bits, group size, symmetric) lists its modules by
exact name (`targets`), so a mixed-precision plan is explicit module by module; format
`pack-quantized` (codes in int32, zero points packed along the output dim, fp16 scales).

The planner's grid maps onto compressed-tensors' signed one exactly: a planner code q in
[0, 2^b) with integer zero z gives w = s (q - z) = s ((q - 2^(b-1)) - (z - 2^(b-1))), so the
library's zero point is z - 2^(b-1) (0 for symmetric levels), and quantizing the dequantized
weight against the DB's fp16 scale returns exactly the DB's codes (checked before writing).

    model = load_compressed(OUT)     # decompressed by compressed-tensors: dequantized Linear weights
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from planner.export.base import BadExport, ExportContext, ExportResult, planned_units, register


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise BadExport("--format compressed-tensors needs the compressed-tensors package: "
                        "pip install compressed-tensors") from None
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    return ModelCompressor, QuantizationArgs, QuantizationConfig, QuantizationScheme, QuantizationStatus, \
        apply_quantization_config


@register
class CompressedTensorsExporter:
    name = "compressed-tensors"
    target = "vllm"
    description = "compressed-tensors pack-quantized checkpoint (vllm serve OUT; llm-compressor)"

    def export(self, ctx: ExportContext) -> ExportResult:
        ModelCompressor, Args, Config, Scheme, Status, apply_config = _ct()
        units = planned_units(ctx)
        by_scheme: dict[tuple[int, int, bool], list[str]] = {}
        for u in units:
            s = ctx.spec_of(u.name)
            by_scheme.setdefault((s.bits, s.group_size, s.symmetric), []).append(u.name)
        groups = {f"group_{i}": Scheme(targets=names, weights=Args(
            num_bits=bits, type="int", symmetric=sym, strategy="group" if gs else "channel", group_size=gs or None))
            for i, ((bits, gs, sym), names) in enumerate(sorted(by_scheme.items()))}
        config = Config(config_groups=groups, format="pack-quantized", ignore=["lm_head"],
                        quantization_status=Status.FROZEN)
        model = copy.deepcopy(ctx.model).float()
        apply_config(model, config, show_progress=False)
        for u in units:
            _set_qparams(model.get_submodule(u.name), ctx.quantized(u.name))
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
        compressor.compress_model(model)
        _check_codes(model, ctx, units)
        model.to(ctx.dtype)
        model.save_pretrained(ctx.out)
        compressor.update_config(str(ctx.out))
        ctx.tokenizer.save_pretrained(ctx.out)
        lines = [f"{len(units)} modules in {len(groups)} config group(s): " + ", ".join(
            f"{len(n)}x int{b} {'g' + str(g) if g else 'per-channel'}{' sym' if s else ''}"
            for (b, g, s), n in sorted(by_scheme.items())), f"serve: vllm serve {ctx.shown}"]
        return ExportResult(self.name, ctx.out, sorted(p.name for p in ctx.out.iterdir()), lines,
                            {"config_groups": len(groups)})


def _set_qparams(module: nn.Module, qw) -> None:
    """The DB's scale and zero point into the library's parameters; weight = the dequantized level."""
    half = 2 ** (qw.spec.bits - 1)
    module.weight.data = qw.dequantize(torch.float32)
    if module.weight_scale.shape != qw.scales.shape:
        raise BadExport(f"compressed-tensors expects scales of shape {tuple(module.weight_scale.shape)}, the levels DB "
                        f"holds {tuple(qw.scales.shape)}")
    module.weight_scale.data.copy_(qw.scales.float())
    if getattr(module, "weight_zero_point", None) is not None:
        module.weight_zero_point.data.copy_((qw.zeros_unpacked() - half).to(module.weight_zero_point.dtype))


def _check_codes(model: nn.Module, ctx: ExportContext, units) -> None:
    """The packed codes the library wrote must be the DB's codes (exactness of the grid mapping)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    for u in units:
        m = model.get_submodule(u.name)
        qw = ctx.quantized(u.name)
        codes = unpack_from_int32(m.weight_packed, qw.spec.bits, torch.Size(qw.shape)).to(torch.int16)
        if not torch.equal(codes + 2 ** (qw.spec.bits - 1), qw.codes_unpacked().to(torch.int16)):
            raise BadExport(f"compressed-tensors re-quantized {u.name} to codes that differ from the levels DB")


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Reload an export and decompress it with compressed-tensors (weights dequantized into Linear)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    ModelCompressor, _, Config, _, _, apply_config = _ct()
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    qconfig = Config.model_validate(config.quantization_config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_config(model, qconfig, show_progress=False)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)          # modules take the compressed layout, then receive the tensors
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("lm_head.")]:
        raise BadExport(f"{str(path)!r} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    compressor.decompress_model(model)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval().requires_grad_(False)
