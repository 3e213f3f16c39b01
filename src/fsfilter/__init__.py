"""fsfilter: watch, allow, deny, change and hide file operations on Linux, with the CBFS Filter API.

``from fsfilter import *`` gives the SDK's names and nothing else: CBFilter, CBMonitor, CBProcess, CBEncrypt,
PassthroughFilter, CBFSFilterError, the constants (``fsfilter.api.constants``) and the event-parameter classes
(``CBFilter…EventParams``, ``CBMonitor…EventParams``, ``CBProcess…EventParams`` and their base EventParams).
"""

# ruff: noqa: F405 (__all__ names the constants the star import below brings)
from typing import TYPE_CHECKING

from fsfilter.api import monitor_params as _monitor_params
from fsfilter.api import params as _params
from fsfilter.api import process_params as _process_params
from fsfilter.api.cbfilter import CBFilter, CBFSFilterStream
from fsfilter.api.cbmonitor import CBMonitor
from fsfilter.api.cbprocess import CBProcess
from fsfilter.api.constants import *  # noqa: F403
from fsfilter.api.monitor_params import *  # noqa: F403
from fsfilter.api.params import *  # noqa: F403
from fsfilter.api.passthrough import PassthroughFilter
from fsfilter.api.process_params import *  # noqa: F403
from fsfilter.errors import CBFSFilterError

if TYPE_CHECKING:
    from fsfilter.api.cbencrypt import CBEncrypt


def __getattr__(name: str) -> object:
    # CBEncrypt loads the crypto library: only for programs that use it (the watchdog, the holder and every CLI tool
    # import this package, and their start-up time counts).
    if name == "CBEncrypt":
        from fsfilter.api.cbencrypt import CBEncrypt
        return CBEncrypt
    raise AttributeError(f"module 'fsfilter' has no attribute {name!r}")

__version__ = "0.1.0"

# Spelled out, constants included (the same list as constants.__all__; tests/test_exports.py keeps the two
# equal): type checkers read only a literal __all__, and code that does `from fsfilter import *` is checked too.
__all__ = [
    "CBFilter", "CBMonitor", "CBProcess", "CBEncrypt", "PassthroughFilter", "CBFSFilterError", "CBFSFilterStream",
    "FILE_SYS_ATTR_ARCHIVE", "FILE_SYS_ATTR_COMPRESSED", "FILE_SYS_ATTR_DIRECTORY", "FILE_SYS_ATTR_ENCRYPTED",
    "FILE_SYS_ATTR_HIDDEN", "FILE_SYS_ATTR_NORMAL", "FILE_SYS_ATTR_NOT_CONTENT_INDEXED", "FILE_SYS_ATTR_OFFLINE",
    "FILE_SYS_ATTR_READ_ONLY", "FILE_SYS_ATTR_REPARSE_POINT", "FILE_SYS_ATTR_SPARSE_FILE", "FILE_SYS_ATTR_SYSTEM",
    "FILE_SYS_ATTR_TEMPORARY", "FILE_ATTRIBUTE_VIRTUAL_FILE",
    "ACCESS_NONE", "ACCESS_READ_ONLY", "ACCESS_WRITE_ONLY", "ACCESS_DELETE_PROTECT", "ACCESS_EXECUTE_PROTECT",
    "ACCESS_NO_CHANGE_DAC", "ACCESS_NO_CHANGE_OWNER", "ACCESS_RENAME_PROTECT", "ACCESS_DELETE_ONLY_PROTECT",
    "ACCESS_REMOTE_ACCESS_PROTECT", "ACCESS_DENY_ALL", "ACCESS_ALL_FLAGS",
    "FS_CE_NONE", "FS_CE_BEFORE_CREATE", "FS_CE_AFTER_CREATE", "FS_CE_BEFORE_OPEN", "FS_CE_AFTER_OPEN",
    "FS_CE_BEFORE_READ", "FS_CE_AFTER_READ", "FS_CE_BEFORE_WRITE", "FS_CE_AFTER_WRITE", "FS_CE_BEFORE_LOCK_CONTROL",
    "FS_CE_AFTER_LOCK_CONTROL", "FS_CE_BEFORE_CLEANUP", "FS_CE_AFTER_CLEANUP", "FS_CE_BEFORE_CLOSE",
    "FS_CE_AFTER_CLOSE", "FS_CE_BEFORE_CAN_DELETE", "FS_CE_AFTER_CAN_DELETE", "FS_CE_BEFORE_DELETE",
    "FS_CE_AFTER_DELETE", "FS_CE_BEFORE_RENAME", "FS_CE_AFTER_RENAME", "FS_CE_BEFORE_CREATE_HARD_LINK",
    "FS_CE_AFTER_CREATE_HARD_LINK", "FS_CE_BEFORE_SET_SIZES", "FS_CE_AFTER_SET_SIZES", "FS_CE_AFTER_GET_SIZES",
    "FS_CE_BEFORE_SET_ATTRIBUTES", "FS_CE_AFTER_SET_ATTRIBUTES", "FS_CE_BEFORE_QUERY_FILE_INFO",
    "FS_CE_AFTER_QUERY_FILE_INFO", "FS_CE_BEFORE_SET_FILE_INFO", "FS_CE_AFTER_SET_FILE_INFO",
    "FS_CE_BEFORE_GET_SECURITY", "FS_CE_AFTER_GET_SECURITY", "FS_CE_BEFORE_SET_SECURITY", "FS_CE_AFTER_SET_SECURITY",
    "FS_CE_BEFORE_ENUMERATE_DIRECTORY", "FS_CE_AFTER_ENUMERATE_DIRECTORY", "FS_CE_BEFORE_FSCTL", "FS_CE_AFTER_FSCTL",
    "FS_CE_BEFORE_IOCTL", "FS_CE_AFTER_IOCTL", "FS_CE_BEFORE_QUERY_EA", "FS_CE_AFTER_QUERY_EA", "FS_CE_BEFORE_SET_EA",
    "FS_CE_AFTER_SET_EA", "FS_CE_BEFORE_GET_REPARSE_POINT", "FS_CE_AFTER_GET_REPARSE_POINT",
    "FS_CE_BEFORE_SET_REPARSE_POINT", "FS_CE_AFTER_SET_REPARSE_POINT", "FS_CE_BEFORE_DELETE_REPARSE_POINT",
    "FS_CE_AFTER_DELETE_REPARSE_POINT", "FS_CE_REPARSE_FILENAME", "FS_CE_REPARSE_TAG", "FS_CE_ALL",
    "FS_NE_NONE", "FS_NE_CREATE", "FS_NE_OPEN", "FS_NE_READ", "FS_NE_WRITE", "FS_NE_LOCK_CONTROL", "FS_NE_CLEANUP",
    "FS_NE_CLOSE", "FS_NE_CAN_DELETE", "FS_NE_DELETE", "FS_NE_RENAME", "FS_NE_CREATE_HARD_LINK", "FS_NE_SET_SIZES",
    "FS_NE_GET_SIZES", "FS_NE_SET_ATTRIBUTES", "FS_NE_QUERY_FILE_INFO", "FS_NE_SET_FILE_INFO", "FS_NE_GET_SECURITY",
    "FS_NE_SET_SECURITY", "FS_NE_ENUMERATE_DIRECTORY", "FS_NE_FSCTL", "FS_NE_IOCTL", "FS_NE_QUERY_EA", "FS_NE_SET_EA",
    "FS_NE_GET_REPARSE_POINT", "FS_NE_SET_REPARSE_POINT", "FS_NE_DELETE_REPARSE_POINT", "FS_NE_ALL",
    "FS_MOUNT_IGNORE", "FS_MOUNT_NOTIFY", "FS_MOUNT_CONTROL", "FS_MOUNT_BOTH",
    "FS_REQUEST_DIR_USER_NONCACHED", "FS_REQUEST_DIR_USER_CACHED", "FS_REQUEST_DIR_SYSTEM_NONCACHED",
    "FS_REQUEST_DIR_SYSTEM_CACHED",
    "FS_REPARSE_CHANGE_PATH", "FS_REPARSE_USE_REPARSE_POINT",
    "DESIRED_ACCESS_FILE_READ_DATA", "DESIRED_ACCESS_FILE_WRITE_DATA", "DESIRED_ACCESS_FILE_APPEND_DATA",
    "DESIRED_ACCESS_FILE_EXECUTE", "DESIRED_ACCESS_FILE_READ_ATTRIBUTES", "DESIRED_ACCESS_DELETE",
    "DESIRED_ACCESS_FILE_GENERIC_READ",
    "FILESYS_SHARE_NONE", "FILESYS_SHARE_READ", "FILESYS_SHARE_WRITE", "FILESYS_SHARE_DELETE",
    "FILE_DISPOSITION_CREATE_NEW", "FILE_DISPOSITION_CREATE_ALWAYS", "FILE_DISPOSITION_OPEN_EXISTING",
    "FILE_DISPOSITION_OPEN_ALWAYS", "FILE_DISPOSITION_TRUNCATE_EXISTING",
    "OWNER_SECURITY_INFORMATION", "GROUP_SECURITY_INFORMATION", "DACL_SECURITY_INFORMATION",
    "PROCESS_EVENT_PROCESS_CREATION", "PROCESS_EVENT_PROCESS_TERMINATION", "PROCESS_EVENT_THREAD_CREATION",
    "PROCESS_EVENT_THREAD_TERMINATION",
    "SERIALIZE_EVENTS_ON_MULTIPLE_THREADS", "SERIALIZE_EVENTS_ON_ONE_WORKER_THREAD",
    "MODULE_STATUS_NOT_PRESENT", "MODULE_STATUS_STOPPED", "MODULE_STATUS_RUNNING",
    "INSTALL_REMOVE_OLD_VERSIONS", "INSTALL_KEEP_START_TYPE",
    "UNINSTALL_VERSION_PREVIOUS", "UNINSTALL_VERSION_CURRENT", "UNINSTALL_VERSION_ALL",
    "ACCESS_KNOWN", "FS_CE_KNOWN", "FS_NE_KNOWN",
]

# The event-parameter classes (EventParams and every CBFilter…, CBMonitor…, CBProcess…EventParams): the generated
# modules list exactly these. mypy does not follow `+=` of another module's list, so through the star import it sees
# only the literal names above; import a parameter class by name to have it checked.
__all__ += _params.__all__
__all__ += _monitor_params.__all__
__all__ += _process_params.__all__
