"""The `carecl` command line; every argparse line of carecl lives in this package (entry point: cli/main.py)."""
