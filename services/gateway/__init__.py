"""The gRPC gateway in front of the engine fleet."""
