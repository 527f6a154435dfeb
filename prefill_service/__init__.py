"""The prefill pod: computes prompts' KV and pushes it into decode pods' blocks."""

__version__ = "0.1.0"
