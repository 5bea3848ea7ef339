"""OpenAI-compatible HTTP gateway in front of the router's gRPC API (see README.md)."""
