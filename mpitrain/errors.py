"""The one exception type that means "the user's input is wrong": one line, exit code 2."""

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input (config, data, command line). Printed as one line; the job exits with 2."""


class AgreedError(UserError):
    """A UserError that every rank raises at the same point (see World.agree), so the job
    can end cleanly with exit code 2 instead of MPI_Abort."""
