"""Errors that describe bad user input (a config, a file, a flag) rather than a bug."""


class UserError(Exception):
    """Bad input from the user; entry points print its message as one line and exit with status 1."""
