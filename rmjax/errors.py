"""Errors raised on bad input. Messages name the file, line, field and the fix."""


class RmjaxError(Exception):
    """Base class for errors caused by user input (printed without a traceback by the CLI)."""


class ConfigError(RmjaxError):
    pass


class CheckpointError(RmjaxError):
    pass


class DataError(RmjaxError):
    pass
