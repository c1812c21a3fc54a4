"""The root of carecl's user-facing errors: the CLI prints these and exits with status 2."""


class CareclError(Exception):
    """A problem the user can fix (bad config, data, run directory, checkpoint); its message says what and where."""
