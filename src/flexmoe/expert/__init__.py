"""Owner side: anchored expert training, the expert package, and (later) differential privacy."""
