"""moebus's common library: wire format, subjects, config, logging, model loading."""
