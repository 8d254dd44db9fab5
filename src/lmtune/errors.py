"""The one exception the CLI shows as a single line: a mistake in the config, data or model choice.

Every module raises its own subclass (ConfigError, DataError, ModelError,
TrainingError, ...); `lmtune` catches UserError once, prints `error: ...` and
exits 1. Anything else is a bug in lmtune and keeps its traceback. No torch here.
"""


class UserError(Exception):
    pass
