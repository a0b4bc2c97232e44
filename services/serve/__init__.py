"""Ray Serve: engine replicas, the session-affinity router, the local fleet."""
