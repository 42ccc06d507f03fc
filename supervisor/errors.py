"""Errors the user caused or can fix: the CLI prints their message as one line."""


class UsageError(Exception):
    """Bad input or environment: one clear line, exit code 2."""
