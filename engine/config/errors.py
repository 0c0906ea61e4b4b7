"""The one error a bad config raises."""


class ConfigError(ValueError):
    """A bad config value; the message names the key."""
