"""expert-worker: holds a share of the experts in MLX and answers expert requests."""
