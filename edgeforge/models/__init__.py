"""edgeforge.models."""
