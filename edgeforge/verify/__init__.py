"""edgeforge.verify."""
