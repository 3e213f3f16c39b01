"""sessions layer."""
