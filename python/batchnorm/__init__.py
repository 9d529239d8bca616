"""batchnorm: Keras' BatchNormalization layer with exact Keras numbers, computed by C++/OpenMP
kernels at memory-bandwidth speed, zero-copy on NumPy arrays."""

from . import constraints, initializers, regularizers
from ._core import buffer_cache_info, cuda_available, empty_buffer_cache, set_buffer_cache_limit
from .keras_files import load_keras
from .layer import BatchNormalization, Variable
from .serialization import deserialize, serialize

__version__ = "0.1.0"

__all__ = [
    "BatchNormalization",
    "Variable",
    "buffer_cache_info",
    "constraints",
    "cuda_available",
    "deserialize",
    "empty_buffer_cache",
    "initializers",
    "load_keras",
    "regularizers",
    "serialize",
    "set_buffer_cache_limit",
    "__version__",
]
