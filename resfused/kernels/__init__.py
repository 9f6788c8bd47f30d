"""Kernel adapters: one per way of computing an op (see base.py); the op layer ranks and runs them."""
