"""Events flowing out of the store: subscriptions, projections, process managers."""
