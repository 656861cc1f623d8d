"""moebus's services: gateway -> router -> expert workers, all over NATS."""
