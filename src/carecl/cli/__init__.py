"""The `carecl` command line; every argparse line of carecl lives in this package."""

from carecl.cli.main import main

__all__ = ["main"]
