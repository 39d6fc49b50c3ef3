"""The one error of a `job evaluate` run that is the user's to fix."""


class JobError(ValueError):
    """Unusable arguments or output directory (the CLI prints one line and exits 2)."""
