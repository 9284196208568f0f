"""The exceptions a user sees as one line on stderr.

`ConfigError` covers usage and configuration mistakes (exit code 2), a path that names
nothing (a missing checkpoint, run or file) among them; `LlmctlError` covers everything
that goes wrong at run time (exit code 1), such as a file that is there but damaged.
Messages name the key, path or value at fault and say what to do instead.
"""


class LlmctlError(Exception):
    """A failure the user can act on; shown as one line, exit code 1."""

    exit_code = 1


class ConfigError(LlmctlError):
    """A bad preset, key, type or value; shown as one line, exit code 2."""

    exit_code = 2

