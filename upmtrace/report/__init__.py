"""Pure renderers of results: they format, they never compute model state."""
