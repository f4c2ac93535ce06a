"""stepflow's Python client."""
