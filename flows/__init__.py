"""Prefect flows: wiring only; every step is a medidiff library function."""
