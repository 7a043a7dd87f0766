"""The wire: the sans-IO protocol, the protocol server, the command line."""
