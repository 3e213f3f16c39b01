"""fsfilter: watch, allow, deny, change and hide file operations on Linux, with the CBFS Filter API."""

from fsfilter.api.passthrough import PassthroughFilter
from fsfilter.errors import CBFSFilterError

__all__ = ["CBFSFilterError", "PassthroughFilter"]
__version__ = "0.1.0"
