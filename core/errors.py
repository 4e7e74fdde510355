"""User errors: a bad config or input, reported as one line before any work starts."""


class ConfigError(ValueError):
    """The run cannot start as configured; the message names the problem and the valid choices."""
