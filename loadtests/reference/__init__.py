"""Reference apps for the benchmark: the naive FastAPI variants podserve is measured against."""
