"""edgeforge.distill.techniques."""
