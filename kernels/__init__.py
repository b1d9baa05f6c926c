"""Triton kernels, each beside a pure-PyTorch reference with the same signature.

Never imports s2core or nodes. Each module's public function dispatches on `backend=` and the
tensor's device: Triton on CUDA, the reference elsewhere.
"""
