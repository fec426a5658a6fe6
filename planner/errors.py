"""Typed errors. Library code raises these; only `planner.cli` turns them into exit codes.

Every message is one line that says what is wrong and how to fix it.
"""


class PlannerError(Exception):
    """Base class: a user-facing problem (bad input, missing resource). CLI exit code 2."""


class BadBudget(PlannerError):
    pass


class BadModel(PlannerError):
    pass


class BadDataset(PlannerError):
    pass


class BadSearchSpace(PlannerError):
    pass


class BadRunDir(PlannerError):
    pass


class BadPlan(PlannerError):
    pass
