"""Helpers for the engine tests: a raw publisher and bad frames, a bus recorder, process launchers."""
