"""The one error type the runtime raises for bad input; messages name the problem and the fix."""


class RuntimeInputError(ValueError):
    """Bad artifact, prompt or generation setting."""
