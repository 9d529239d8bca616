"""batchnorm: Keras' BatchNormalization layer with exact Keras numbers, computed by C++/OpenMP
kernels at memory-bandwidth speed, zero-copy on NumPy arrays."""

from . import constraints, initializers, regularizers
from ._core import cuda_available
from .keras_files import load_keras
from .layer import BatchNormalization, Variable
from .serialization import deserialize, serialize

__version__ = "0.1.0"

__all__ = [
    "BatchNormalization",
    "Variable",
    "constraints",
    "cuda_available",
    "deserialize",
    "initializers",
    "load_keras",
    "regularizers",
    "serialize",
    "__version__",
]
