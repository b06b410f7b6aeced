"""edgeforge.plan."""
