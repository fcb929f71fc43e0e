"""Errors a user can cause: each carries one clear message and is shown without a traceback."""


class FedsimError(Exception):
    """A problem with the user's input or environment (config, data files, cluster address)."""


class ConfigError(FedsimError):
    """An experiment spec that is malformed, names an unknown key, or holds a bad value."""


class DataError(FedsimError):
    """A dataset that cannot be found, downloaded, verified or partitioned as asked."""


class RunFailed(FedsimError):
    """A run that started but cannot go on (clients keep failing, the model diverged); the
    finished rounds are on disk. The command line exits with status 1 for it."""

    exit_code = 1
