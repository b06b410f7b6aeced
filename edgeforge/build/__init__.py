"""edgeforge.build."""
