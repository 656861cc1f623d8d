"""moebus benchmarks: `make bench`. Timings live here, never in the test suite."""
