"""Per-unit sensitivity and the predicted damage of every (unit, level).

    sens = session_sensitivity(session, SensitivityConfig(score=Score.HUTCHINSON))   # cached
    rows = sens.rows(problem)          # [unit][level] predicted damage: data for ilp / lagrange / hessian

Scores: `hutchinson` (Hessian trace of the KL, HVPs through autograd), `fisher` (empirical Fisher
trace), `noise` (HIGGS noise-injection coefficients), `proxy` (layer-local GPTQ-Hessian error).
Torch lives here; the searchers in `planner/search/` only ever see the resulting numbers.
"""

from planner.sensitivity.plans import needs_sensitivity, problem_for, proxy_inputs, session_sensitivity
from planner.sensitivity.score import Score, Sensitivity, SensitivityConfig, compute_sensitivity, level_errors

__all__ = ["Score", "Sensitivity", "SensitivityConfig", "compute_sensitivity", "level_errors", "needs_sensitivity",
           "problem_for", "proxy_inputs", "session_sensitivity"]
