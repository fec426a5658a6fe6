"""Levels: every unit's compressed forms. Importing this package registers the builders."""

import planner.levels.drop  # noqa: F401  (registers drop: sub-block keep / drop)
import planner.levels.formats  # noqa: F401  (registers format: super-block scales, nf/iq4nl/k-means grids)
import planner.levels.gguf_levels  # noqa: F401  (registers gguf: llama.cpp tensor types as levels)
import planner.levels.joint  # noqa: F401  (registers joint: sparsegpt + gptq in one pass)
import planner.levels.sparse  # noqa: F401  (registers sparsegpt, wanda, magnitude)
from planner.levels import quant_levels  # noqa: F401  (registers gptq, rtn)
