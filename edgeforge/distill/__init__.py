"""edgeforge.distill."""
