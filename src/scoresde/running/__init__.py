"""running layer."""
