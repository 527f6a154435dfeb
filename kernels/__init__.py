"""Kernels: Triton kernels beside their plain-torch references, and one dispatcher.

``kernels.ops`` is what the engine calls. For a CUDA tensor it runs the Triton kernel;
on CPU the reference -- except under ``TRITON_INTERPRET=1``, where the Triton kernels
run in Triton's interpreter (the CPU kernel tests). ``kernels.reference`` defines what
every kernel computes.
"""

__version__ = "0.1.0"
