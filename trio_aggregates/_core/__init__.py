"""The registry layer: the registry, the library's exceptions, option checks.
It knows nothing of event sourcing."""
