"""Built-in targets (YAML): mapped into the package as edgeforge.builtin.targets, see edgeforge.paths."""
