"""Fault and bad-input suite: real Redis, workers and sinks broken on purpose."""
