"""Benchmarks of the selfspec engine."""
