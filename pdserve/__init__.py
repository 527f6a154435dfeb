"""pdserve's command line: the top of the import graph (it starts every role)."""

__version__ = "0.1.0"
