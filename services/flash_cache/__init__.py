"""flash-cache: experts served from SSD through a fixed DRAM budget."""
