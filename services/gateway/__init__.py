"""gateway: the OpenAI-compatible HTTP API, talking to the router over NATS."""
