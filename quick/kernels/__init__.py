"""GPU kernels for the packed layouts.

* :mod:`quick.kernels.jit`: nvcc at first use, cubins cached on disk, launch through the driver API.
* :mod:`quick.kernels.mma`: the QUICK mma.sync GEMM and the decode GEMV (sm_80+), layout ``quick``.
* :mod:`quick.kernels.ops`: ``torch.ops.quick.gemm_w4a16`` (custom op with a fake implementation).
* :mod:`quick.kernels.dispatch`: the registry that maps a layout and an input to a kernel.
* :mod:`quick.kernels.compile_check`: ``python -m quick.kernels.compile_check`` builds every variant.

Importing this package needs neither CUDA nor nvcc.
"""

from quick.kernels.dispatch import kernel_for, register_kernel

__all__ = ["kernel_for", "register_kernel"]
