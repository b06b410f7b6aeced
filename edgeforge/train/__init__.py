"""edgeforge.train."""
