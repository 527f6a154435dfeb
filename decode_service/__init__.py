"""The decode pod: reserves KV blocks, has them filled (remotely or locally), decodes and
streams tokens."""

__version__ = "0.1.0"
