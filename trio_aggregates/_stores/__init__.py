"""The event stores: the protocol and the in-memory store, the durable shell, group
commit, SQLite, PostgreSQL, opening by URL. Stores never decode events."""
