"""The one error type users see: a bad input, reported by the CLI as a single line with exit code 2."""


class InputError(ValueError):
    """A problem with what the user gave us (a path, a config, a weight, an option), not a bug."""
