"""Built-in pipelines (YAML): mapped into the package as edgeforge.builtin.pipelines, see edgeforge.paths."""
