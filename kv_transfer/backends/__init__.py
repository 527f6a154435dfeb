"""Connector backends: each module (or package) here defines ``BACKEND`` and is found by
kv_transfer/registry.py; nothing else lists them."""
