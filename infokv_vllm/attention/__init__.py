"""The attention-backend extension of vLLM's paged attention: vLLM's own backends, whose impl also records the
attention signal (`backends.ScoringBackends`). Each platform adapter (`platforms/`) names only which of vLLM's
backends it wraps."""
