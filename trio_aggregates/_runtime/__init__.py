"""The event-sourced runtime: the pure aggregate, the codec, the sans-IO command step,
the repository. Imports the stores and the registry, never the wire."""
