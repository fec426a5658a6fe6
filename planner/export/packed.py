"""The planner's own packed format: the levels DB's stored form of the planned level of each unit,
everything else of the model as plain tensors, and a JSON manifest. Any level kind travels: each
stored level writes itself as tensors (`to_tensors`) and its builder reads them back (`from_tensors`).

    OUT/
      config.json, tokenizer files      the base model's (transformers layout)
      packed.safetensors                per planned module `<module>.<field>`, exactly as in the levels
                                        DB: codes|scales|zeros|meta (gptq / rtn: QuantizedWeight),
                                        codes|scales|mins|d|dmin|table|colscale|meta (format:
                                        FormatWeight), blocks|meta (gguf: GGUFWeight, llama.cpp's bytes)
      base.safetensors                  every other tensor (embeddings, norms, lm_head), in --dtype
      packed.json                       schema 2, per module: level, builder (which class reads the
                                        tensors back), the level's spec JSON, shape, stored bits;
                                        schema 1 files (integer levels only) still load

    model = load_packed(OUT)                                  # dequantized nn.Linear weights
    model = load_packed(OUT, linear=my_lowbit_linear)         # kernels: build each module yourself
    weights = load_packed_weights(OUT)                        # {module: stored level}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from planner.export.base import (
    BadExport,
    ExportContext,
    ExportResult,
    level_specs,
    planned_units,
    register,
    state_dict_without,
)
from planner.levels.registry import BUILDERS, Stored

PACKED_SCHEMA = 2
_READABLE = (1, 2)     # schema 1: integer levels, no `builder` field


@register
class PackedExporter:
    name = "packed"
    target = "packed"
    description = "planner's packed safetensors + JSON manifest (load with planner.export.packed.load_packed)"

    def export(self, ctx: ExportContext) -> ExportResult:
        units = planned_units(ctx)
        tensors: dict[str, torch.Tensor] = {}
        modules = {}
        specs = level_specs(ctx.space)
        for u in units:
            level = ctx.level_of(u.name)
            info = next(lv for lv in ctx.db.levels(u.name) if lv.id == level)
            tensors.update(ctx.stored(u.name).to_tensors(u.name))
            modules[u.name] = {"level": level, "builder": info.builder, "spec": specs[level].to_json(),
                               "shape": list(u.shape), "stored_bits": info.stored_bits}
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
        kinds = sorted({m["builder"] for m in modules.values()})
        lines = [f"{len(modules)} packed modules ({', '.join(kinds)} levels), {total / 1e6:.2f} MB as stored",
                 f"load: planner.export.packed.load_packed({str(ctx.shown)!r})"]
        return ExportResult(self.name, ctx.out, files, lines, {"packed_modules": len(modules)})


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads((path / "packed.json").read_text())
    except FileNotFoundError:
        raise BadExport(f"{str(path)!r} is not a planner packed export (no packed.json)") from None
    if manifest.get("schema") not in _READABLE:
        raise BadExport(f"packed export schema {manifest.get('schema')} is not supported (expected one of {_READABLE})")
    return manifest


def load_packed_weights(path: str | Path) -> dict[str, Stored]:
    """{module name: stored level} of a packed export (still packed: QuantizedWeight, FormatWeight,
    GGUFWeight, ... as the levels DB holds them)."""
    import planner.levels  # noqa: F401  (registers every builder)

    manifest = read_manifest(path)
    tensors = load_file(str(Path(path) / "packed.safetensors"))
    out = {}
    for name, entry in manifest["modules"].items():
        builder = entry.get("builder", "gptq")
        if builder not in BUILDERS:
            raise BadExport(f"packed export {str(path)!r}: {name} holds a {builder!r} level, which this planner "
                            f"cannot read (known: {', '.join(sorted(BUILDERS))})")
        try:
            out[name] = BUILDERS[builder].load(tensors, name)
        except (KeyError, ValueError) as e:
            raise BadExport(f"packed export {str(path)!r}: the tensors of {name} are damaged ({e})") from None
    return out


def dequantized_linear(stored: Stored, old: nn.Linear, dtype: torch.dtype) -> nn.Module:
    """The default module builder: a plain nn.Linear holding the dequantized weight."""
    old.weight.data = stored.dequantize(dtype)
    return old


def load_packed(path: str | Path, dtype: torch.dtype = torch.float32,
                linear: Callable[[Stored, nn.Linear, torch.dtype], nn.Module] = dequantized_linear) -> nn.Module:
    """A transformers causal LM from a packed export. `linear(stored, module, dtype)` returns the module
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
    for name, stored in weights.items():
        parent, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent), attr, linear(stored, old, dtype))
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval().requires_grad_(False)
