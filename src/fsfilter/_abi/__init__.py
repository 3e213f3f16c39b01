"""abi layer."""
