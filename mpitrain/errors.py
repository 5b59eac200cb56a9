"""Exceptions that end a job with a known exit code and one line instead of a traceback.

`agreed` says whether every rank raises it at the same point: then the job ends cleanly
(collective cleanup is safe, rank 0 prints); otherwise only this rank knows, so it prints
its line and aborts the job."""

EXIT_USAGE = 2
EXIT_OOM = 5  # a rank ran out of memory (the job is aborted)


class UserError(Exception):
    """Bad input (config, data, command line). Printed as one line; the job exits with 2."""

    agreed = False
    exit_code = EXIT_USAGE


class AgreedError(UserError):
    """A UserError that every rank raises at the same point (see World.agree), so the job
    can end cleanly with exit code 2 instead of MPI_Abort."""

    agreed = True


def out_of_memory(e: BaseException) -> str | None:
    """One line for an allocation failure (MemoryError, torch's CPU or CUDA allocator), or
    None for any other exception."""
    text = str(e)
    if not isinstance(e, MemoryError) and "can't allocate memory" not in text and "out of memory" not in text.lower():
        return None
    import re

    size = re.search(r"allocate (\d+) bytes", text) or re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", text)
    what = (f"allocating {int(size.group(1)) / 2**20:,.1f} MiB" if size and size.group(1).isdigit()
            else f"allocating {size.group(1)}" if size else type(e).__name__)
    return (f"out of memory ({what}): shard the optimizer state and gradients over the ranks "
            "(sync.strategy = 'zero', stage 2), or use a smaller model or train.batch_size, or more ranks")
