"""carecl."""
