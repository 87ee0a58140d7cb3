"""Japanese evaluation."""
