"""Real low-bit inference for planned models: packed linears, real-kernel evaluation, latency tables.

    from planner.runtime import pack_model, load_packed, RealEvaluator
"""

from planner.runtime.evaluate import RealEvaluator, real_evaluator
from planner.runtime.packed import PackedLinear, load_packed, pack_model, packed_from_quantized, packed_modules

__all__ = ["PackedLinear", "RealEvaluator", "load_packed", "pack_model", "packed_from_quantized", "packed_modules",
           "real_evaluator"]
