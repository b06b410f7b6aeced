"""Built-in data mapped into the package at build time (see pyproject.toml and edgeforge.paths)."""
