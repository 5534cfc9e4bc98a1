"""tartflow: pull Tart VM images reliably, verified, into Tart's own cache.

The core (this package) never imports Prefect; ``tasks/`` and ``flows/`` wrap it.
"""

from .errors import (
                     CorruptLayerError,
                     DigestMismatchError,
                     ImageFormatError,
                     InsufficientSpaceError,
                     InterruptedPull,
                     InvalidReferenceError,
                     RegistryError,
                     StoreError,
                     TartflowError,
                     UsageError,
)
from .reference import Reference, parse_reference

__version__ = "0.1.0"

__all__ = [
    "CorruptLayerError", "DigestMismatchError", "ImageFormatError", "InsufficientSpaceError",
    "InterruptedPull", "InvalidReferenceError", "Reference", "RegistryError", "StoreError",
    "TartflowError", "UsageError", "parse_reference",
]
