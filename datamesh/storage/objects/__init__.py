"""Object store backends and the per-region router."""
