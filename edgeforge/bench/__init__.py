"""edgeforge.bench."""
