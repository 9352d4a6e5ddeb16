"""graphs/' one error type: the optimized graph cannot be built; the message names the pass or option."""


class GraphError(ValueError):
    """A pass fired a different number of times than the model implies, or a bad target or dtype."""
