"""Scale-out over PostgreSQL: membership, shard leases with fencing, placement, routing."""
