"""A Python client for stepflow's services (grpcio and protobuf only)."""
