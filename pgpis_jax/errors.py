"""Errors that describe bad user input (a config, a file, a flag) rather than a bug."""


class UserError(Exception):
    """Bad input from the user; entry points print its message as one line and exit with status 1."""


def os_error_message(error: OSError) -> str:
    """One line for a file that could not be read or written: the path, the system's reason and what to do."""
    import errno

    where = f"{error.filename}: " if error.filename else ""
    reason = error.strerror or str(error)
    hint = {errno.ENOSPC: "the disk is full: free space there and rerun",
            errno.EDQUOT: "the disk quota is used up: free space there and rerun",
            errno.EROFS: "the file system is read-only: choose a writable location",
            errno.EACCES: "no permission: choose a location you may write to",
            errno.EPERM: "no permission: choose a location you may write to",
            errno.ENOTDIR: "a file is where a directory is expected",
            errno.EEXIST: "it exists already"}.get(error.errno, "")
    return f"{where}{reason}" + (f" ({hint})" if hint else "")
