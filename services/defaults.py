"""Every setting's default, written once: the services' typed configs and the CLI's flags (and
their help) read them here. Light on purpose: importing it loads no MLX."""

from __future__ import annotations

from shared.messages import DEFAULT_DEADLINE_S

# router
MAX_RUNNING = 16  # sequences decoded together
MAX_WAITING = 64  # accepted but not yet decoding; beyond that, 429
PREFILL_STEP = 512  # prompt tokens per step
MICRO_BATCHES = 2
DRAFT_MAX = 4  # drafted tokens a sequence verifies per step, at most (speculative decoding)
SPECULATE_MAX_RUNNING = 4  # a micro-batch of more sequences fills each round trip without drafts
EXPERT_TIMEOUT_S = 30.0
REPLICAS = 1
MAX_PROMPT_TOKENS = 1 << 30
KV_SHARE = 0.25  # of the machine's memory less the router's weights, for running sequences' KV (--kv-budget)
PROMPT_CACHE_SHARE = 0.1  # of the machine's memory, for finished prompts' KV caches (--prompt-cache-bytes)
# gateway
HOST, PORT = "127.0.0.1", 8000
REQUEST_TIMEOUT_S = DEFAULT_DEADLINE_S
MAX_BODY_BYTES = 4 << 20
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5.0
MAX_CONNECTIONS = 2048
# moebus up
WORKERS = 2
NATS_PORT = 4222
NATS_HOST = "127.0.0.1"
# flash-cache
WINDOW = 5  # experts the last K tokens used stay in memory
FLASH_POLICIES = ("lfu", "lru")  # eviction outside the window
FLASH_MODES = ("cache", "on-demand", "naive")  # on-demand and naive: the benchmark's baselines
READ_THREADS = 4
