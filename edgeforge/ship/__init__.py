"""edgeforge.ship."""
