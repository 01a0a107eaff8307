"""Benchmarks of SARRegistration against classical and learned baselines (see benchmarks/README.md)."""
