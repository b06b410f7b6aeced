"""``edgeforge build``: one command from a device profile to a ship folder, as a composition of cached stages."""
