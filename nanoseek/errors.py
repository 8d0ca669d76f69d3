"""Errors that the CLI turns into one clear line and exit code 2 (bad input, not a bug)."""


class UsageError(Exception):
    """Bad input from the user: a missing file, an unknown name, a corrupt checkpoint. Message says what to do."""
