"""Hand-written models, one per file."""
