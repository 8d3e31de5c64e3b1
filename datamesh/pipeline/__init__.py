"""The ingestion pipeline: the public API, the saga steps and compensations, backpressure, dedup, reads."""
