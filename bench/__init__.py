"""moelab benchmarks: JSON + markdown, never asserted (see bench/README.md)."""
