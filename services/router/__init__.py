"""router: everything but the experts; each MoE layer's experts are asked over NATS."""
