"""edgeforge.export."""
