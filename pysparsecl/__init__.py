"""pysparsecl: OpenCL kernels for sparse deep learning, on any OpenCL device."""

__version__ = "0.1.0"

from .ops._prepared import clear_weight_cache  # noqa: E402
from .ops.compact import CompactRows  # noqa: E402
from .ops.conv2d import (  # noqa: E402
    SparseConvWeight,
    conv2d_output_shape,
    conv2d_sparse,
    fold_batchnorm,
)
from .ops.drs import (  # noqa: E402
    ProjectedWeight,
    SparseRandomProjection,
    drs_mask,
    drs_mask_conv2d,
    random_mask,
)
from .ops.elementwise import add, add_relu, axpby, mul, relu_backward  # noqa: E402
from .ops.masked import (  # noqa: E402
    MaskedLinearWeight,
    conv2d_masked,
    conv2d_masked_backward,
    masked_matmul,
    masked_matmul_backward,
    masked_relu_bn,
    masked_relu_bn_backward,
)
from .ops.pooling import (  # noqa: E402
    avg_pool2d,
    avg_pool2d_backward,
    max_pool2d,
    max_pool2d_backward,
)
from .ops.training import (  # noqa: E402
    channel_sums,
    column_sums,
    sgd_step,
    softmax_cross_entropy,
)
from .runtime import (  # noqa: E402
    KernelBuildError,
    LaunchGraph,
    NoDeviceError,
    get_queue,
    list_devices,
)

__all__ = [
    "__version__",
    # direct sparse convolution
    "conv2d_sparse", "conv2d_output_shape", "SparseConvWeight", "fold_batchnorm",
    # DSG: masked products, dimension-reduction search, double-mask BatchNorm
    "masked_matmul", "masked_matmul_backward", "MaskedLinearWeight", "masked_relu_bn",
    "masked_relu_bn_backward",
    "conv2d_masked", "conv2d_masked_backward",
    "drs_mask", "drs_mask_conv2d", "random_mask", "SparseRandomProjection",
    "ProjectedWeight", "CompactRows",
    # elementwise
    "add", "mul", "axpby", "add_relu", "relu_backward",
    # pooling
    "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
    # training
    "softmax_cross_entropy", "column_sums", "channel_sums", "sgd_step",
    # runtime
    "clear_weight_cache", "LaunchGraph", "KernelBuildError", "NoDeviceError", "get_queue",
    "list_devices",
]
