"""Levels: every unit's compressed forms. Importing this package registers the builders."""

from planner.levels import quant_levels  # noqa: F401  (registers gptq, rtn)
