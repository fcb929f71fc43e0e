"""Errors a user can cause: each carries one clear message and is shown without a traceback."""


class FedsimError(Exception):
    """A problem with the user's input or environment (config, data files, cluster address)."""


class ConfigError(FedsimError):
    """An experiment spec that is malformed, names an unknown key, or holds a bad value."""


class DataError(FedsimError):
    """A dataset that cannot be found, downloaded, verified or partitioned as asked."""
