"""The planner's own packed format: the levels DB's codes/scales/zeros for the planned level of each
unit, everything else of the model as plain tensors, and a JSON manifest.

    OUT/
      config.json, tokenizer files      the base model's (transformers layout)
      packed.safetensors                per planned module `<module>.codes|scales|zeros|meta`, exactly
                                        as in the levels DB (planner.levels.quant.QuantizedWeight)
      base.safetensors                  every other tensor (embeddings, norms, lm_head), in --dtype
      packed.json                       schema, per module: level, method, bits, group size,
                                        symmetric, shape, stored bits

    model = load_packed(OUT)                                  # dequantized nn.Linear weights
    model = load_packed(OUT, linear=my_lowbit_linear)         # kernels: build each module yourself
    weights = load_packed_weights(OUT)                        # {module: QuantizedWeight}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from planner.export.base import BadExport, ExportContext, ExportResult, planned_units, register, state_dict_without
from planner.levels.quant import QuantizedWeight, stored_bits

PACKED_SCHEMA = 1


@register
class PackedExporter:
    name = "packed"
    target = "packed"
    description = "planner's packed safetensors + JSON manifest (load with planner.export.packed.load_packed)"

    def export(self, ctx: ExportContext) -> ExportResult:
        units = planned_units(ctx)
        tensors: dict[str, torch.Tensor] = {}
        modules = {}
        for u in units:
            qw = ctx.quantized(u.name)
            tensors.update(qw.to_tensors(u.name))
            s = ctx.spec_of(u.name)
            modules[u.name] = {"level": ctx.level_of(u.name), "method": s.method.value, "bits": qw.spec.bits,
                               "group_size": qw.spec.group_size, "symmetric": qw.spec.symmetric,
                               "shape": list(qw.shape), "stored_bits": stored_bits(qw.shape, qw.spec)}
        save_file(tensors, str(ctx.out / "packed.safetensors"))
        names = {f"{u.name}.weight" for u in units}
        base = state_dict_without(ctx.model, lambda n: n in names, ctx.dtype)
        save_file(base, str(ctx.out / "base.safetensors"))
        manifest = {"schema": PACKED_SCHEMA, "dtype": str(ctx.dtype).removeprefix("torch."), "modules": modules}
        (ctx.out / "packed.json").write_text(json.dumps(manifest, indent=1))
        ctx.model.config.save_pretrained(ctx.out)
        ctx.tokenizer.save_pretrained(ctx.out)
        files = sorted(p.name for p in ctx.out.iterdir())
        total = sum(m["stored_bits"] for m in modules.values()) / 8
        lines = [f"{len(modules)} packed modules, {total / 1e6:.2f} MB of codes/scales/zeros",
                 f"load: planner.export.packed.load_packed({str(ctx.shown)!r})"]
        return ExportResult(self.name, ctx.out, files, lines, {"packed_modules": len(modules)})


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads((path / "packed.json").read_text())
    except FileNotFoundError:
        raise BadExport(f"{str(path)!r} is not a planner packed export (no packed.json)") from None
    if manifest.get("schema") != PACKED_SCHEMA:
        raise BadExport(f"packed export schema {manifest.get('schema')} is not supported (expected {PACKED_SCHEMA})")
    return manifest


def load_packed_weights(path: str | Path) -> dict[str, QuantizedWeight]:
    """{module name: QuantizedWeight} of a packed export (codes still packed)."""
    manifest = read_manifest(path)
    tensors = load_file(str(Path(path) / "packed.safetensors"))
    return {name: QuantizedWeight.from_tensors(tensors, name) for name in manifest["modules"]}


def dequantized_linear(qw: QuantizedWeight, old: nn.Linear, dtype: torch.dtype) -> nn.Module:
    """The default module builder: a plain nn.Linear holding the dequantized weight."""
    old.weight.data = qw.dequantize(dtype)
    return old


def load_packed(path: str | Path, dtype: torch.dtype = torch.float32,
                linear: Callable[[QuantizedWeight, nn.Linear, torch.dtype], nn.Module] = dequantized_linear) -> nn.Module:
    """A transformers causal LM from a packed export. `linear(qw, module, dtype)` returns the module
    that replaces each planned Linear (default: the same Linear with dequantized weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    weights = load_packed_weights(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base = load_file(str(path / "base.safetensors"))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in base.items()}, strict=False)
    expected_missing = {f"{n}.weight" for n in weights}
    if config.tie_word_embeddings:
        expected_missing |= {k for k in missing if k.startswith("lm_head.")}
    if unexpected or set(missing) - expected_missing:
        raise BadExport(f"packed export {str(path)!r} does not match its config "
                        f"(missing {sorted(set(missing) - expected_missing)[:3]}, unexpected {unexpected[:3]})")
    for name, qw in weights.items():
        parent, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent), attr, linear(qw, old, dtype))
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval().requires_grad_(False)
