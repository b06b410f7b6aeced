"""edgeforge.cli."""
