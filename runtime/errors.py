"""The runtime's one error type; messages name the problem and the fix."""


class RuntimeInputError(ValueError):
    """Bad artifact, option, prompt or generation setting."""
