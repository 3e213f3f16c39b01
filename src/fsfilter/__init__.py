"""fsfilter: watch, allow, deny, change and hide file operations on Linux, with the CBFS Filter API.

``from fsfilter import *`` gives the SDK's names: CBFilter, CBMonitor, CBProcess, CBFSFilterError and the constants.
"""

from fsfilter.api.cbfilter import CBFilter as CBFilter
from fsfilter.api.cbmonitor import CBMonitor as CBMonitor
from fsfilter.api.cbprocess import CBProcess as CBProcess
from fsfilter.api.constants import *  # noqa: F403
from fsfilter.api.params import *  # noqa: F403
from fsfilter.api.passthrough import PassthroughFilter as PassthroughFilter
from fsfilter.errors import CBFSFilterError as CBFSFilterError

__version__ = "0.1.0"
