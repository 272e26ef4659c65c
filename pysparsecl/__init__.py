"""pysparsecl: OpenCL kernels for sparse deep learning, on any OpenCL device."""

__version__ = "0.1.0"

from .ops.conv2d import SparseConvWeight, conv2d_output_shape, conv2d_sparse  # noqa: E402
from .runtime import KernelBuildError, NoDeviceError, get_queue, list_devices  # noqa: E402

__all__ = [
    "__version__", "conv2d_sparse", "conv2d_output_shape", "SparseConvWeight",
    "KernelBuildError", "NoDeviceError", "get_queue", "list_devices",
]

from .ops.elementwise import add, add_relu, axpby, mul  # noqa: E402

__all__ += ["add", "mul", "axpby", "add_relu"]
