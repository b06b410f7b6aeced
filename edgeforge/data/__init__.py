"""edgeforge.data."""
