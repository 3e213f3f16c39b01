"""Every event of CBFilter, CBMonitor and CBProcess, declared once.

For each event: its name, the SDK classes that have it, its kind, the rule flag it needs, the kernel operations
it fires on, its parameters (names, Python types, defaults, in order) and a one-line description. The rest is
derived from this table: the event-parameter classes (generated into ``params.py``, ``monitor_params.py`` and
``process_params.py`` by ``scripts/gen_params.py``; a test keeps them in step), CBFilter's ``EVENT_BITS`` and
``NOTIFY_BITS``, and the events each class accepts handlers for.

A parameter name means the same thing in every event, so its type and default are declared once, in
``PARAMETERS``. The kind adds the common fields: ``process_request`` (before), ``status`` (after, notify) and
``result_code`` (all). What each value carries on Linux is in docs/api.md §4.3 and §5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fsfilter.api import constants as c

Kind = Literal["before", "after", "notify", "other"]
SdkClass = Literal["CBFilter", "CBMonitor", "CBProcess"]
__all__ = ["EVENTS", "PARAMETERS", "SDK_CLASSES", "Event", "Parameter", "control_bits", "events_of", "notify_bits"]

SDK_CLASSES: tuple[SdkClass, ...] = ("CBFilter", "CBMonitor", "CBProcess")


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str  # the annotation as source text: the generator writes it, mypy reads it there
    default: object


@dataclass(frozen=True)
class Event:
    name: str
    kind: Kind
    classes: tuple[SdkClass, ...]
    flag: int  # the rule flag that makes it fire: FS_NE_* for notify events, FS_CE_* for the others; 0 = none
    fields: tuple[Parameter, ...]  # every field of its parameter classes, in order (the common ones last)
    doc: str
    fuse: tuple[str, ...] = ()  # CBFilter: the FUSE opcodes (abi.fuse.Opcode names) it fires on
    fanotify: tuple[str, ...] = ()  # CBMonitor, CBProcess: the fanotify events (abi.fanotify names)
    connector: tuple[str, ...] = ()  # CBProcess: the process-connector events (abi.cn_proc names)

    @property
    def control(self) -> int:
        """The FS_CE_* flag a CBFilter rule needs for it (0: none)."""
        return self.flag if self.kind != "notify" else 0

    @property
    def notify(self) -> int:
        """The FS_NE_* flag a rule needs for it (0: none)."""
        return self.flag if self.kind == "notify" else 0

    def class_name(self, sdk: SdkClass) -> str:
        return sdk + "".join(part.capitalize() for part in self.name.split("_")) + "EventParams"


PARAMETERS: dict[str, Parameter] = {}


def _declare(type_: str, default: object, names: str) -> None:
    for name in names.split():
        assert name not in PARAMETERS, name
        PARAMETERS[name] = Parameter(name, type_, default)


_declare("str", "", "file_name new_file_name link_name directory_name file_name_mask backend_file_name volume_name "
                    "ea_name reparsed_name description process_name image_file_name command_line")
_declare("int", 0, "desired_access attributes options create_disposition flags mode file_context handle_context "
                   "directory_context enumeration_context position buffer_length bytes_to_read bytes_to_write "
                   "bytes_read bytes_written direction size allocation_size file_id file_information_class "
                   "valid_bytes security_information length length_needed reparse_tag reparse_buffer_length offset "
                   "key fs_control_code io_control_code input_buffer_length output_buffer_length bytes_returned "
                   "error_code status result_code process_id parent_process_id creating_process_id "
                   "creating_thread_id exit_status thread_id originator_process_id originator_thread_id "
                   "source_process_id target_process_id original_desired_access")
_declare("int", 7, "share_mode")  # FILESYS_SHARE_READ | _WRITE | _DELETE: Linux has no share modes
_declare("int", -1, "owner group")  # -1 = unchanged, as chown(2) says it
_declare("int | None", None, "creation_time last_access_time last_write_time change_time")  # ns; None = not given
_declare("bool", True, "process_request can_delete replace_if_exists")
_declare("bool", False, "virtual_file isolate skip_volume reissue_io restart fail_immediately exclusive_lock "
                        "duplication file_open_name_available")
_declare("bytes", b"", "security_descriptor input_buffer output_buffer")
_declare("bytes | str", b"", "reparse_buffer")  # a symlink target; a handler may give it as str
_declare("ctypes.c_void_p | None", None, "buffer")  # valid only while the handler runs
_declare("memoryview | None", None, "buffer_view")

# Field groups several events share (their names only: types are above).
_CTX = "file_context handle_context"
_BUF = "buffer buffer_length buffer_view"
_CREATE = "file_name desired_access attributes share_mode options create_disposition flags mode"
_TIMES = "creation_time last_access_time last_write_time change_time"
_SEC = "security_information security_descriptor length mode owner group"
_LOCK = "offset length key fail_immediately exclusive_lock"
_FSCTL = "fs_control_code input_buffer input_buffer_length output_buffer output_buffer_length bytes_returned"
_IOCTL = "io_control_code input_buffer input_buffer_length output_buffer output_buffer_length bytes_returned"
_ENTRY = f"directory_name file_name {_TIMES} size allocation_size file_id attributes"
_REPARSE = "reparse_buffer reparse_buffer_length"
_HANDLE_OP = ("originator_process_id originator_thread_id source_process_id target_process_id "
              "original_desired_access desired_access")

# Which classes have an event.
_F: tuple[SdkClass, ...] = ("CBFilter",)
_FM: tuple[SdkClass, ...] = ("CBFilter", "CBMonitor")
_P: tuple[SdkClass, ...] = ("CBProcess",)
_ALL = SDK_CLASSES

# FUSE opcodes shared by several events.
_MAKE = ("CREATE", "MKDIR", "MKNOD", "SYMLINK")
_CLOSE = ("RELEASE", "RELEASEDIR")
_LIST = ("READDIR", "READDIRPLUS")
_RENAME = ("RENAME", "RENAME2")
_REMOVE = ("UNLINK", "RMDIR")
_SET_XATTR = ("SETXATTR", "REMOVEXATTR")
_BY_NAME = ("LOOKUP", *_MAKE, *_REMOVE, *_RENAME, "LINK")  # requests that resolve or change a name

_COMMON: dict[Kind, str] = {"before": "process_request", "after": "status", "notify": "status", "other": ""}


def _ev(name: str, kind: Kind, classes: tuple[SdkClass, ...], flag: int, fields: str, doc: str, *,
        fuse: tuple[str, ...] = (), fanotify: tuple[str, ...] = (), connector: tuple[str, ...] = ()) -> Event:
    names = dict.fromkeys(f"{fields} {_COMMON[kind]} result_code".split())  # ordered, each once
    return Event(name, kind, classes, flag, tuple(PARAMETERS[n] for n in names), doc, fuse, fanotify, connector)


_TABLE: tuple[Event, ...] = (
    # -- create, open, cleanup, close
    _ev("before_create_file", "before", _F, c.FS_CE_BEFORE_CREATE,
        f"{_CREATE} virtual_file isolate backend_file_name {_CTX}",
        "Before a new file, directory, device node or symlink is made.", fuse=_MAKE),
    _ev("after_create_file", "after", _F, c.FS_CE_AFTER_CREATE, f"{_CREATE} {_CTX}",
        "After a new file, directory, device node or symlink was made.", fuse=_MAKE),
    _ev("notify_create_file", "notify", _FM, c.FS_NE_CREATE, _CREATE,
        "A new file, directory, device node or symlink was made (queued).", fuse=_MAKE, fanotify=("FAN_CREATE",)),
    _ev("before_open_file", "before", _F, c.FS_CE_BEFORE_OPEN,
        f"{_CREATE} virtual_file isolate backend_file_name {_CTX}",
        "Before an existing file or directory is opened, or a name under a rule is looked up.",
        fuse=("LOOKUP", "OPEN", "OPENDIR", "CREATE")),
    _ev("after_open_file", "after", _F, c.FS_CE_AFTER_OPEN, f"{_CREATE} {_CTX}",
        "After an existing file or directory was opened.", fuse=("OPEN", "OPENDIR", "CREATE")),
    _ev("notify_open_file", "notify", _FM, c.FS_NE_OPEN, _CREATE,
        "An existing file or directory was opened (queued).", fuse=("OPEN", "OPENDIR", "CREATE"),
        fanotify=("FAN_OPEN", "FAN_OPEN_EXEC")),
    _ev("before_cleanup_file", "before", _F, c.FS_CE_BEFORE_CLEANUP, f"file_name {_CTX}",
        "Before a descriptor of a regular file is closed (every close(2), of each dup too).", fuse=("FLUSH",)),
    _ev("after_cleanup_file", "after", _F, c.FS_CE_AFTER_CLEANUP, f"file_name {_CTX}",
        "After a descriptor of a regular file was closed.", fuse=("FLUSH",)),
    _ev("notify_cleanup_file", "notify", _FM, c.FS_NE_CLEANUP, "file_name",
        "A descriptor of a regular file was closed (queued).", fuse=("FLUSH",)),
    _ev("before_close_file", "before", _F, c.FS_CE_BEFORE_CLOSE, f"file_name {_CTX}",
        "Before the last reference to an open file or directory goes.", fuse=_CLOSE),
    _ev("after_close_file", "after", _F, c.FS_CE_AFTER_CLOSE, f"file_name {_CTX}",
        "After the last reference to an open file or directory went, before the file below is closed.", fuse=_CLOSE),
    _ev("notify_close_file", "notify", _FM, c.FS_NE_CLOSE, "file_name",
        "The last reference to an open file or directory went (queued).", fuse=_CLOSE,
        fanotify=("FAN_CLOSE_WRITE", "FAN_CLOSE_NOWRITE")),
    _ev("cleanup_context", "other", _F, 0, _CTX,
        "A file or handle context ends: the last event that is given it.", fuse=(*_CLOSE, "MKDIR", "MKNOD", "SYMLINK")),
    # -- read, write, sizes
    _ev("before_read_file", "before", _F, c.FS_CE_BEFORE_READ,
        f"file_name position {_BUF} bytes_to_read direction {_CTX}",
        "Before a read is served; process_request=False: the handler filled the buffer.", fuse=("READ",)),
    _ev("after_read_file", "after", _F, c.FS_CE_AFTER_READ,
        f"file_name position {_BUF} bytes_to_read direction bytes_read {_CTX}",
        "After a read was served; the data and bytes_read may be changed.", fuse=("READ",)),
    _ev("notify_read_file", "notify", _FM, c.FS_NE_READ, "file_name position bytes_to_read direction bytes_read",
        "A file was read (queued; no buffer).", fuse=("READ",), fanotify=("FAN_ACCESS",)),
    _ev("before_write_file", "before", _F, c.FS_CE_BEFORE_WRITE,
        f"file_name position {_BUF} bytes_to_write direction {_CTX}",
        "Before a write is served; the data may be changed.", fuse=("WRITE",)),
    _ev("after_write_file", "after", _F, c.FS_CE_AFTER_WRITE,
        f"file_name position {_BUF} bytes_to_write direction bytes_written {_CTX}",
        "After a write was served; bytes_written is the count the kernel is told.", fuse=("WRITE",)),
    _ev("notify_write_file", "notify", _FM, c.FS_NE_WRITE, "file_name position bytes_to_write direction bytes_written",
        "A file was written (queued; no buffer).", fuse=("WRITE",), fanotify=("FAN_MODIFY",)),
    _ev("before_set_file_size", "before", _F, c.FS_CE_BEFORE_SET_SIZES, f"file_name size {_CTX}",
        "Before a file's size is set (truncate(2), ftruncate(2)).", fuse=("SETATTR",)),
    _ev("after_set_file_size", "after", _F, c.FS_CE_AFTER_SET_SIZES, f"file_name size {_CTX}",
        "After a file's size was set.", fuse=("SETATTR",)),
    _ev("notify_set_file_size", "notify", _FM, c.FS_NE_SET_SIZES, "file_name size",
        "A file's size was set (queued).", fuse=("SETATTR",)),
    _ev("before_set_allocation_size", "before", _F, c.FS_CE_BEFORE_SET_SIZES, f"file_name allocation_size {_CTX}",
        "Before space in a file is allocated or punched (fallocate(2)).", fuse=("FALLOCATE",)),
    _ev("after_set_allocation_size", "after", _F, c.FS_CE_AFTER_SET_SIZES, f"file_name allocation_size {_CTX}",
        "After space in a file was allocated or punched.", fuse=("FALLOCATE",)),
    _ev("notify_set_allocation_size", "notify", _FM, c.FS_NE_SET_SIZES, "file_name allocation_size",
        "Space in a file was allocated or punched (queued).", fuse=("FALLOCATE",)),
    _ev("after_get_file_sizes", "after", _F, c.FS_CE_AFTER_GET_SIZES, f"file_name size allocation_size {_CTX}",
        "A file's attributes were read (stat); the sizes reported may be changed.", fuse=("GETATTR",)),
    _ev("notify_get_file_sizes", "notify", _FM, c.FS_NE_GET_SIZES, "file_name size allocation_size",
        "A file's attributes were read (queued).", fuse=("GETATTR",)),
    # -- directory listings
    _ev("before_enumerate_directory", "before", _F, c.FS_CE_BEFORE_ENUMERATE_DIRECTORY,
        "directory_name file_name_mask directory_context handle_context enumeration_context restart",
        "Before a directory listing starts; process_request=False: the listing is empty.", fuse=_LIST),
    _ev("after_enumerate_directory", "after", _F, c.FS_CE_AFTER_ENUMERATE_DIRECTORY,
        f"{_ENTRY} directory_context handle_context enumeration_context process_request",
        "Each entry of a directory listing; process_request=False hides it.", fuse=_LIST),
    _ev("notify_enumerate_directory", "notify", _FM, c.FS_NE_ENUMERATE_DIRECTORY, _ENTRY,
        "A directory entry was listed, or a directory read (queued).", fuse=_LIST, fanotify=("FAN_ACCESS",)),
    _ev("after_close_enumeration", "other", _F, c.FS_CE_BEFORE_CLOSE | c.FS_CE_AFTER_ENUMERATE_DIRECTORY,
        "directory_name directory_context enumeration_context",
        "A directory handle listed with enumeration events was closed.", fuse=("RELEASEDIR",)),
    # -- rename, delete, hard links
    _ev("before_rename_or_move_file", "before", _F, c.FS_CE_BEFORE_RENAME,
        f"file_name new_file_name replace_if_exists flags {_CTX}",
        "Before a file or directory is renamed or moved.", fuse=_RENAME),
    _ev("after_rename_or_move_file", "after", _F, c.FS_CE_AFTER_RENAME,
        f"file_name new_file_name replace_if_exists flags {_CTX}",
        "After a file or directory was renamed or moved.", fuse=_RENAME),
    _ev("notify_rename_or_move_file", "notify", _FM, c.FS_NE_RENAME, "file_name new_file_name replace_if_exists flags",
        "A file or directory was renamed or moved (queued).", fuse=_RENAME, fanotify=("FAN_RENAME",)),
    _ev("before_can_file_be_deleted", "before", _F, c.FS_CE_BEFORE_CAN_DELETE, f"file_name can_delete {_CTX}",
        "First step of unlink(2) or rmdir(2); can_delete=False refuses it.", fuse=_REMOVE),
    _ev("after_can_file_be_deleted", "after", _F, c.FS_CE_AFTER_CAN_DELETE, f"file_name can_delete {_CTX}",
        "Right after before_can_file_be_deleted; can_delete may still be changed.", fuse=_REMOVE),
    _ev("notify_can_file_be_deleted", "notify", _FM, c.FS_NE_CAN_DELETE, "file_name can_delete",
        "A file or directory was asked to be deleted (queued, with the final can_delete).", fuse=_REMOVE),
    _ev("before_delete_file", "before", _F, c.FS_CE_BEFORE_DELETE, f"file_name {_CTX}",
        "Just before a file or directory is deleted.", fuse=_REMOVE),
    _ev("after_delete_file", "after", _F, c.FS_CE_AFTER_DELETE, f"file_name {_CTX}",
        "After a file or directory was deleted.", fuse=_REMOVE),
    _ev("notify_delete_file", "notify", _FM, c.FS_NE_DELETE, "file_name",
        "A file or directory was deleted (queued).", fuse=_REMOVE, fanotify=("FAN_DELETE",)),
    _ev("before_create_hard_link", "before", _F, c.FS_CE_BEFORE_CREATE_HARD_LINK,
        f"file_name link_name replace_if_exists {_CTX}", "Before a hard link is made (link(2)).", fuse=("LINK",)),
    _ev("after_create_hard_link", "after", _F, c.FS_CE_AFTER_CREATE_HARD_LINK,
        f"file_name link_name replace_if_exists {_CTX}", "After a hard link was made.", fuse=("LINK",)),
    _ev("notify_create_hard_link", "notify", _FM, c.FS_NE_CREATE_HARD_LINK, "file_name link_name replace_if_exists",
        "A hard link was made (queued).", fuse=("LINK",), fanotify=("FAN_CREATE",)),
    # -- attributes, file information, security
    _ev("before_set_file_attributes", "before", _F, c.FS_CE_BEFORE_SET_ATTRIBUTES,
        f"file_name {_TIMES} attributes {_CTX}",
        "Before a file's times are set (utimensat(2), touch).", fuse=("SETATTR",)),
    _ev("after_set_file_attributes", "after", _F, c.FS_CE_AFTER_SET_ATTRIBUTES,
        f"file_name {_TIMES} attributes {_CTX}",
        "After a file's times were set.", fuse=("SETATTR",)),
    _ev("notify_set_file_attributes", "notify", _FM, c.FS_NE_SET_ATTRIBUTES, f"file_name {_TIMES} attributes",
        "A file's times or attributes were set (queued).", fuse=("SETATTR",), fanotify=("FAN_ATTRIB",)),
    _ev("before_query_file_info", "before", _F, c.FS_CE_BEFORE_QUERY_FILE_INFO,
        f"file_name file_information_class {_BUF} valid_bytes {_CTX}",
        "Only for handler-served views and virtual files: stat asks their size and times (docs/api.md).",
        fuse=("LOOKUP", "GETATTR")),
    _ev("after_query_file_info", "after", _F, c.FS_CE_AFTER_QUERY_FILE_INFO,
        f"file_name file_information_class {_BUF} valid_bytes {_CTX}",
        "Never fired on Linux (the handler of before_query_file_info completes it)."),
    _ev("notify_query_file_info", "notify", _FM, c.FS_NE_QUERY_FILE_INFO,
        f"file_name file_information_class {_BUF} valid_bytes", "Never fired on Linux (see before_query_file_info)."),
    _ev("before_set_file_info", "before", _F, c.FS_CE_BEFORE_SET_FILE_INFO,
        f"file_name file_information_class {_BUF} valid_bytes {_CTX}",
        "Only for handler-served views and virtual files: truncate(2) sets their size (docs/api.md).",
        fuse=("SETATTR",)),
    _ev("after_set_file_info", "after", _F, c.FS_CE_AFTER_SET_FILE_INFO,
        f"file_name file_information_class {_BUF} valid_bytes {_CTX}",
        "Never fired on Linux (see before_set_file_info)."),
    _ev("notify_set_file_info", "notify", _FM, c.FS_NE_SET_FILE_INFO,
        f"file_name file_information_class {_BUF} valid_bytes", "Never fired on Linux (see before_set_file_info)."),
    _ev("before_get_file_security", "before", _F, c.FS_CE_BEFORE_GET_SECURITY, f"file_name {_SEC} length_needed {_CTX}",
        "Before a POSIX ACL is read (getxattr of system.posix_acl_*).", fuse=("GETXATTR",)),
    _ev("after_get_file_security", "after", _F, c.FS_CE_AFTER_GET_SECURITY, f"file_name {_SEC} length_needed {_CTX}",
        "After a POSIX ACL was read.", fuse=("GETXATTR",)),
    _ev("notify_get_file_security", "notify", _FM, c.FS_NE_GET_SECURITY, f"file_name {_SEC}",
        "A POSIX ACL was read (queued).", fuse=("GETXATTR",)),
    _ev("before_set_file_security", "before", _F, c.FS_CE_BEFORE_SET_SECURITY, f"file_name {_SEC} {_CTX}",
        "Before mode, owner, group or a POSIX ACL is changed (chmod, chown, setfacl).", fuse=("SETATTR", *_SET_XATTR)),
    _ev("after_set_file_security", "after", _F, c.FS_CE_AFTER_SET_SECURITY, f"file_name {_SEC} {_CTX}",
        "After mode, owner, group or a POSIX ACL was changed.", fuse=("SETATTR", *_SET_XATTR)),
    _ev("notify_set_file_security", "notify", _FM, c.FS_NE_SET_SECURITY, f"file_name {_SEC}",
        "Mode, owner, group or a POSIX ACL was changed (queued).", fuse=("SETATTR", *_SET_XATTR),
        fanotify=("FAN_ATTRIB",)),
    # -- extended attributes, symlinks
    _ev("before_query_ea", "before", _F, c.FS_CE_BEFORE_QUERY_EA, f"file_name ea_name {_BUF} valid_bytes {_CTX}",
        "Before an extended attribute is read, or their names listed.", fuse=("GETXATTR", "LISTXATTR")),
    _ev("after_query_ea", "after", _F, c.FS_CE_AFTER_QUERY_EA, f"file_name ea_name {_BUF} valid_bytes {_CTX}",
        "After an extended attribute was read, or their names listed.", fuse=("GETXATTR", "LISTXATTR")),
    _ev("notify_query_ea", "notify", _FM, c.FS_NE_QUERY_EA, f"file_name ea_name {_BUF} valid_bytes",
        "An extended attribute was read, or their names listed (queued).", fuse=("GETXATTR", "LISTXATTR")),
    _ev("before_set_ea", "before", _F, c.FS_CE_BEFORE_SET_EA, f"file_name ea_name {_BUF} {_CTX}",
        "Before an extended attribute is set or removed.", fuse=_SET_XATTR),
    _ev("after_set_ea", "after", _F, c.FS_CE_AFTER_SET_EA, f"file_name ea_name {_BUF} {_CTX}",
        "After an extended attribute was set or removed.", fuse=_SET_XATTR),
    _ev("notify_set_ea", "notify", _FM, c.FS_NE_SET_EA, f"file_name ea_name {_BUF}",
        "An extended attribute was set or removed (queued).", fuse=_SET_XATTR),
    _ev("before_get_reparse_point", "before", _F, c.FS_CE_BEFORE_GET_REPARSE_POINT,
        f"file_name {_REPARSE} valid_bytes {_CTX}",
        "Before a symlink's target is read (readlink(2), path walks).", fuse=("READLINK",)),
    _ev("after_get_reparse_point", "after", _F, c.FS_CE_AFTER_GET_REPARSE_POINT,
        f"file_name {_REPARSE} valid_bytes {_CTX}",
        "After a symlink's target was read; the target returned may be changed.", fuse=("READLINK",)),
    _ev("notify_get_reparse_point", "notify", _FM, c.FS_NE_GET_REPARSE_POINT, f"file_name {_REPARSE} valid_bytes",
        "A symlink's target was read (queued).", fuse=("READLINK",)),
    _ev("before_set_reparse_point", "before", _F, c.FS_CE_BEFORE_SET_REPARSE_POINT,
        f"file_name reparse_tag {_REPARSE} {_CTX}",
        "Never fired on Linux: an existing file cannot become a symlink."),
    _ev("after_set_reparse_point", "after", _F, c.FS_CE_AFTER_SET_REPARSE_POINT,
        f"file_name reparse_tag {_REPARSE} {_CTX}", "Never fired on Linux (see before_set_reparse_point)."),
    _ev("notify_set_reparse_point", "notify", _FM, c.FS_NE_SET_REPARSE_POINT, f"file_name reparse_tag {_REPARSE}",
        "Never fired on Linux (see before_set_reparse_point)."),
    _ev("before_delete_reparse_point", "before", _F, c.FS_CE_BEFORE_DELETE_REPARSE_POINT,
        f"file_name reparse_tag {_REPARSE} {_CTX}",
        "Never fired on Linux: unlink(2) removes a symlink and fires the delete events."),
    _ev("after_delete_reparse_point", "after", _F, c.FS_CE_AFTER_DELETE_REPARSE_POINT,
        f"file_name reparse_tag {_REPARSE} {_CTX}", "Never fired on Linux (see before_delete_reparse_point)."),
    _ev("notify_delete_reparse_point", "notify", _FM, c.FS_NE_DELETE_REPARSE_POINT,
        f"file_name reparse_tag {_REPARSE}", "Never fired on Linux (see before_delete_reparse_point)."),
    # -- locks
    _ev("before_lock", "before", _F, c.FS_CE_BEFORE_LOCK_CONTROL, f"file_name {_LOCK} {_CTX}",
        "Before a lock is taken (fcntl(2) F_SETLK/F_SETLKW/F_OFD_*, lockf(3), flock(2)).", fuse=("SETLK", "SETLKW")),
    _ev("after_lock", "after", _F, c.FS_CE_AFTER_LOCK_CONTROL, f"file_name {_LOCK} {_CTX}",
        "After a lock request was decided (granted, or failed).", fuse=("SETLK", "SETLKW")),
    _ev("notify_lock", "notify", _FM, c.FS_NE_LOCK_CONTROL, f"file_name {_LOCK}",
        "A lock request was decided (queued).", fuse=("SETLK", "SETLKW")),
    _ev("before_unlock_all", "before", _F, c.FS_CE_BEFORE_LOCK_CONTROL, f"file_name {_CTX}",
        "Before the locks that go with a close are dropped (it cannot be refused).", fuse=("FLUSH", "RELEASE")),
    _ev("after_unlock_all", "after", _F, c.FS_CE_AFTER_LOCK_CONTROL, f"file_name {_CTX}",
        "After the locks that go with a close were dropped.", fuse=("FLUSH", "RELEASE")),
    _ev("notify_unlock_all", "notify", _FM, c.FS_NE_LOCK_CONTROL, "file_name",
        "The locks that went with a close were dropped (queued).", fuse=("FLUSH", "RELEASE")),
    _ev("before_unlock_all_by_key", "before", _F, c.FS_CE_BEFORE_LOCK_CONTROL, f"file_name key {_CTX}",
        "Never fired on Linux: no call unlocks by key (a close fires the unlock-all events)."),
    _ev("after_unlock_all_by_key", "after", _F, c.FS_CE_AFTER_LOCK_CONTROL, f"file_name key {_CTX}",
        "Never fired on Linux (see before_unlock_all_by_key)."),
    _ev("notify_unlock_all_by_key", "notify", _FM, c.FS_NE_LOCK_CONTROL, "file_name key",
        "Never fired on Linux (see before_unlock_all_by_key)."),
    _ev("before_unlock_single", "before", _F, c.FS_CE_BEFORE_LOCK_CONTROL, f"file_name offset length key {_CTX}",
        "Before a range is unlocked (F_UNLCK, flock(2) LOCK_UN).", fuse=("SETLK", "SETLKW")),
    _ev("after_unlock_single", "after", _F, c.FS_CE_AFTER_LOCK_CONTROL, f"file_name offset length key {_CTX}",
        "After a range was unlocked.", fuse=("SETLK", "SETLKW")),
    _ev("notify_unlock_single", "notify", _FM, c.FS_NE_LOCK_CONTROL, "file_name offset length key",
        "A range was unlocked (queued).", fuse=("SETLK", "SETLKW")),
    # -- FSCTL, IOCTL
    _ev("before_fsctl", "before", _F, c.FS_CE_BEFORE_FSCTL, f"file_name {_FSCTL} {_CTX}",
        "Never fired on Linux: Windows file-system control codes (ioctl(2) fires the ioctl events)."),
    _ev("after_fsctl", "after", _F, c.FS_CE_AFTER_FSCTL, f"file_name {_FSCTL} {_CTX}",
        "Never fired on Linux (see before_fsctl)."),
    _ev("notify_fsctl", "notify", _FM, c.FS_NE_FSCTL, f"file_name {_FSCTL}",
        "Never fired on Linux (see before_fsctl)."),
    _ev("before_ioctl", "before", _F, c.FS_CE_BEFORE_IOCTL, f"file_name {_IOCTL} {_CTX}",
        "Before an ioctl(2) the kernel forwards is served.", fuse=("IOCTL",)),
    _ev("after_ioctl", "after", _F, c.FS_CE_AFTER_IOCTL, f"file_name {_IOCTL} {_CTX}",
        "After a forwarded ioctl(2) was served.", fuse=("IOCTL",)),
    _ev("notify_ioctl", "notify", _FM, c.FS_NE_IOCTL, f"file_name {_IOCTL}",
        "A forwarded ioctl(2) was served (queued).", fuse=("IOCTL",)),
    # -- volumes (fired as fire_volume_events asks, not by rules), the filter itself, reparse, threads, errors
    _ev("before_filter_attach_to_volume", "other", _FM, 0, "volume_name skip_volume",
        "Before the filter attaches to a directory or file system; skip_volume=True skips it."),
    _ev("after_filter_attach_to_volume", "other", _FM, 0, "volume_name",
        "After the filter attached to a directory (a mount) or a file system (a fanotify mark)."),
    _ev("after_filter_detach_from_volume", "other", _FM, 0, "volume_name",
        "After the filter detached from a directory or a file system."),
    _ev("notify_filter_attach_to_volume", "other", _FM, 0, "volume_name",
        "The filter attached to a directory or a file system (queued)."),
    _ev("notify_filter_detach_from_volume", "other", _FM, 0, "volume_name",
        "The filter detached from a directory or a file system (queued)."),
    _ev("filter_start", "other", _FM, 0, "", "At the end of start_filter, on the caller's thread."),
    _ev("filter_stop", "other", _FM, 0, "", "At the end of stop_filter, after the queued notifications."),
    _ev("reparse_file_name", "other", _F, c.FS_CE_REPARSE_FILENAME, "file_name reparsed_name",
        "A name under a rule is resolved or changed; reparsed_name may send it elsewhere.", fuse=_BY_NAME),
    _ev("reparse_with_tag", "other", _F, c.FS_CE_REPARSE_TAG, f"file_name reparse_tag {_REPARSE} reissue_io",
        "Never fired on Linux: there are no reparse tags."),
    _ev("error", "other", _ALL, 0, "error_code description",
        "Something failed outside a request's answer: a handler raised, an event expired, events were lost."),
    _ev("worker_thread_creation", "other", _ALL, 0, "", "An event worker thread started."),
    _ev("worker_thread_termination", "other", _ALL, 0, "", "An event worker thread is ending."),
    # -- processes and threads
    _ev("process_creation", "other", _P, 0,
        "process_id parent_process_id creating_process_id creating_thread_id process_name image_file_name "
        "file_open_name_available command_line",
        "A program starts in a process (an exec, or a fork that never execs); result_code refuses an exec.",
        fanotify=("FAN_OPEN_EXEC_PERM",), connector=("PROC_EVENT_FORK", "PROC_EVENT_EXEC", "PROC_EVENT_EXIT")),
    _ev("process_termination", "other", _P, 0, "process_id process_name exit_status", "A process ended.",
        connector=("PROC_EVENT_EXIT",)),
    _ev("process_handle_operation", "other", _P, 0, f"duplication process_id {_HANDLE_OP}",
        "Not available on Linux: there are no process handles whose access could be narrowed."),
    _ev("thread_creation", "other", _P, 0, "process_id thread_id creating_process_id creating_thread_id",
        "A thread was created.", connector=("PROC_EVENT_FORK",)),
    _ev("thread_termination", "other", _P, 0, "process_id thread_id", "A thread ended.",
        connector=("PROC_EVENT_EXIT",)),
    _ev("thread_handle_operation", "other", _P, 0, f"duplication process_id thread_id {_HANDLE_OP}",
        "Not available on Linux: there are no thread handles whose access could be narrowed."),
)

EVENTS: dict[str, Event] = {event.name: event for event in _TABLE}
assert len(EVENTS) == len(_TABLE), "an event is declared twice"


def events_of(sdk: SdkClass) -> dict[str, Event]:
    """The events of one SDK class, in table order."""
    return {name: event for name, event in EVENTS.items() if sdk in event.classes}


def control_bits() -> dict[str, int]:
    """CBFilter event -> the FS_CE_* flag it needs (what CBFilter.EVENT_BITS is)."""
    return {name: event.control for name, event in events_of("CBFilter").items() if event.control}


def notify_bits() -> dict[str, int]:
    """CBFilter event -> the FS_NE_* flag it needs (what CBFilter.NOTIFY_BITS is)."""
    return {name: event.notify for name, event in events_of("CBFilter").items() if event.notify}
