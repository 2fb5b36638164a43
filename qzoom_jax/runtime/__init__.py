"""Plumbing every layer may use: mesh and sharding rules, multi-process start, the shared CLI, buckets, errors."""
