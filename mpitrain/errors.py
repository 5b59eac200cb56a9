"""Exceptions that end a job with a known exit code and one line instead of a traceback.

`agreed` says whether every rank raises it at the same point: then the job ends cleanly
(collective cleanup is safe, rank 0 prints); otherwise only this rank knows, so it prints
its line and aborts the job."""

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input (config, data, command line). Printed as one line; the job exits with 2."""

    agreed = False
    exit_code = EXIT_USAGE


class AgreedError(UserError):
    """A UserError that every rank raises at the same point (see World.agree), so the job
    can end cleanly with exit code 2 instead of MPI_Abort."""

    agreed = True
