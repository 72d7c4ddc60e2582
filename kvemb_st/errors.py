"""The error a bad configuration value raises, in a module of its own so that every validator can raise it."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the source and the key."""
