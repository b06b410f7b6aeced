"""Built-in profiles (YAML): mapped into the package as edgeforge.builtin.profiles, see edgeforge.paths."""
