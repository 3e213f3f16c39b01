"""Event-parameter classes: ``CBFilter<Event>EventParams`` with the SDK's parameter names.

Every class has the SDK's fields (Linux values, see docs/api.md), ``result_code`` (0 on entry; an errno
to fail the request) and, for Before events, ``process_request``. Buffers are given both ways: ``buffer``
is a ``ctypes.c_void_p`` to ``buffer_length`` bytes (the SDK way, for ``ctypes.memmove``) and
``buffer_view`` a writable ``memoryview`` of the same bytes; both are valid only inside the handler.
"""

from __future__ import annotations

from typing import Any


class EventParams:
    """Base of every event-parameter class; fields are plain attributes."""

    __slots__: tuple[str, ...] = ()
    _defaults: dict[str, Any] = {}

    def __init__(self, **fields: Any) -> None:
        for name, value in self._defaults.items():
            object.__setattr__(self, name, value)
        for name, value in fields.items():
            object.__setattr__(self, name, value)  # AttributeError for a field the event does not have

    def __getattr__(self, name: str) -> Any:  # only reached for fields the class does not define
        raise AttributeError(f"{type(self).__name__} has no parameter {name!r}")

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__
                          if n not in ("buffer", "buffer_view", "security_descriptor", "input_buffer",
                                       "output_buffer", "reparse_buffer"))
        return f"{type(self).__name__}({shown})"


_CTX = "file_context handle_context"
_BUF = "buffer buffer_length buffer_view"
_CREATE = ("file_name desired_access attributes share_mode options create_disposition flags mode")
_TIMES = "creation_time last_access_time last_write_time change_time"
_SEC = "security_information security_descriptor length mode owner group"
_LOCK = "offset length key fail_immediately exclusive_lock"
_IOCTL = "io_control_code input_buffer input_buffer_length output_buffer output_buffer_length bytes_returned"
_ENUM_ENTRY = (f"directory_name file_name {_TIMES} size allocation_size file_id attributes")

# event name -> (kind, fields); kind: B before (process_request), A after (status), N notify (status), O other
EVENTS: dict[str, tuple[str, str]] = {
    "before_create_file": ("B", f"{_CREATE} virtual_file isolate backend_file_name {_CTX}"),
    "after_create_file": ("A", f"{_CREATE} {_CTX}"),
    "notify_create_file": ("N", _CREATE),
    "before_open_file": ("B", f"{_CREATE} virtual_file isolate backend_file_name {_CTX}"),
    "after_open_file": ("A", f"{_CREATE} {_CTX}"),
    "notify_open_file": ("N", _CREATE),
    "before_cleanup_file": ("B", f"file_name {_CTX}"),
    "after_cleanup_file": ("A", f"file_name {_CTX}"),
    "notify_cleanup_file": ("N", "file_name"),
    "before_close_file": ("B", f"file_name {_CTX}"),
    "after_close_file": ("A", f"file_name {_CTX}"),
    "notify_close_file": ("N", "file_name"),
    "cleanup_context": ("O", _CTX),
    "before_read_file": ("B", f"file_name position {_BUF} bytes_to_read direction {_CTX}"),
    "after_read_file": ("A", f"file_name position {_BUF} bytes_to_read direction bytes_read {_CTX}"),
    "notify_read_file": ("N", "file_name position bytes_to_read direction bytes_read"),
    "before_write_file": ("B", f"file_name position {_BUF} bytes_to_write direction {_CTX}"),
    "after_write_file": ("A", f"file_name position {_BUF} bytes_to_write direction bytes_written {_CTX}"),
    "notify_write_file": ("N", "file_name position bytes_to_write direction bytes_written"),
    "before_set_file_size": ("B", f"file_name size {_CTX}"),
    "after_set_file_size": ("A", f"file_name size {_CTX}"),
    "notify_set_file_size": ("N", "file_name size"),
    "before_set_allocation_size": ("B", f"file_name allocation_size {_CTX}"),
    "after_set_allocation_size": ("A", f"file_name allocation_size {_CTX}"),
    "notify_set_allocation_size": ("N", "file_name allocation_size"),
    "after_get_file_sizes": ("A", f"file_name size allocation_size {_CTX}"),
    "notify_get_file_sizes": ("N", "file_name size allocation_size"),
    "before_enumerate_directory": ("B", "directory_name file_name_mask directory_context handle_context "
                                        "enumeration_context restart"),
    "after_enumerate_directory": ("A", f"{_ENUM_ENTRY} directory_context handle_context enumeration_context "
                                       "process_request"),
    "notify_enumerate_directory": ("N", _ENUM_ENTRY),
    "after_close_enumeration": ("O", "directory_name directory_context enumeration_context"),
    "before_rename_or_move_file": ("B", f"file_name new_file_name replace_if_exists flags {_CTX}"),
    "after_rename_or_move_file": ("A", f"file_name new_file_name replace_if_exists flags {_CTX}"),
    "notify_rename_or_move_file": ("N", "file_name new_file_name replace_if_exists flags"),
    "before_can_file_be_deleted": ("B", f"file_name can_delete {_CTX}"),
    "after_can_file_be_deleted": ("A", f"file_name can_delete {_CTX}"),
    "notify_can_file_be_deleted": ("N", "file_name can_delete"),
    "before_delete_file": ("B", f"file_name {_CTX}"),
    "after_delete_file": ("A", f"file_name {_CTX}"),
    "notify_delete_file": ("N", "file_name"),
    "before_create_hard_link": ("B", f"file_name link_name replace_if_exists {_CTX}"),
    "after_create_hard_link": ("A", f"file_name link_name replace_if_exists {_CTX}"),
    "notify_create_hard_link": ("N", "file_name link_name replace_if_exists"),
    "before_set_file_attributes": ("B", f"file_name {_TIMES} attributes {_CTX}"),
    "after_set_file_attributes": ("A", f"file_name {_TIMES} attributes {_CTX}"),
    "notify_set_file_attributes": ("N", f"file_name {_TIMES} attributes"),
    "before_query_file_info": ("B", f"file_name file_information_class {_BUF} valid_bytes {_CTX}"),
    "after_query_file_info": ("A", f"file_name file_information_class {_BUF} valid_bytes {_CTX}"),
    "notify_query_file_info": ("N", f"file_name file_information_class {_BUF} valid_bytes"),
    "before_set_file_info": ("B", f"file_name file_information_class {_BUF} valid_bytes {_CTX}"),
    "after_set_file_info": ("A", f"file_name file_information_class {_BUF} valid_bytes {_CTX}"),
    "notify_set_file_info": ("N", f"file_name file_information_class {_BUF} valid_bytes"),
    "before_get_file_security": ("B", f"file_name {_SEC} length_needed {_CTX}"),
    "after_get_file_security": ("A", f"file_name {_SEC} length_needed {_CTX}"),
    "notify_get_file_security": ("N", f"file_name {_SEC}"),
    "before_set_file_security": ("B", f"file_name {_SEC} {_CTX}"),
    "after_set_file_security": ("A", f"file_name {_SEC} {_CTX}"),
    "notify_set_file_security": ("N", f"file_name {_SEC}"),
    "before_query_ea": ("B", f"file_name ea_name {_BUF} valid_bytes {_CTX}"),
    "after_query_ea": ("A", f"file_name ea_name {_BUF} valid_bytes {_CTX}"),
    "notify_query_ea": ("N", f"file_name ea_name {_BUF} valid_bytes"),
    "before_set_ea": ("B", f"file_name ea_name {_BUF} {_CTX}"),
    "after_set_ea": ("A", f"file_name ea_name {_BUF} {_CTX}"),
    "notify_set_ea": ("N", f"file_name ea_name {_BUF}"),
    "before_get_reparse_point": ("B", f"file_name reparse_buffer reparse_buffer_length valid_bytes {_CTX}"),
    "after_get_reparse_point": ("A", f"file_name reparse_buffer reparse_buffer_length valid_bytes {_CTX}"),
    "notify_get_reparse_point": ("N", "file_name reparse_buffer reparse_buffer_length valid_bytes"),
    "before_set_reparse_point": ("B", f"file_name reparse_tag reparse_buffer reparse_buffer_length {_CTX}"),
    "after_set_reparse_point": ("A", f"file_name reparse_tag reparse_buffer reparse_buffer_length {_CTX}"),
    "notify_set_reparse_point": ("N", "file_name reparse_tag reparse_buffer reparse_buffer_length"),
    "before_delete_reparse_point": ("B", f"file_name reparse_tag reparse_buffer reparse_buffer_length {_CTX}"),
    "after_delete_reparse_point": ("A", f"file_name reparse_tag reparse_buffer reparse_buffer_length {_CTX}"),
    "notify_delete_reparse_point": ("N", "file_name reparse_tag reparse_buffer reparse_buffer_length"),
    "before_lock": ("B", f"file_name {_LOCK} {_CTX}"),
    "after_lock": ("A", f"file_name {_LOCK} {_CTX}"),
    "notify_lock": ("N", f"file_name {_LOCK}"),
    "before_unlock_all": ("B", f"file_name {_CTX}"),
    "after_unlock_all": ("A", f"file_name {_CTX}"),
    "notify_unlock_all": ("N", "file_name"),
    "before_unlock_all_by_key": ("B", f"file_name key {_CTX}"),
    "after_unlock_all_by_key": ("A", f"file_name key {_CTX}"),
    "notify_unlock_all_by_key": ("N", "file_name key"),
    "before_unlock_single": ("B", f"file_name offset length key {_CTX}"),
    "after_unlock_single": ("A", f"file_name offset length key {_CTX}"),
    "notify_unlock_single": ("N", "file_name offset length key"),
    "before_fsctl": ("B", f"file_name fs_control_code input_buffer input_buffer_length output_buffer "
                          f"output_buffer_length bytes_returned {_CTX}"),
    "after_fsctl": ("A", f"file_name fs_control_code input_buffer input_buffer_length output_buffer "
                         f"output_buffer_length bytes_returned {_CTX}"),
    "notify_fsctl": ("N", "file_name fs_control_code input_buffer input_buffer_length output_buffer "
                          "output_buffer_length bytes_returned"),
    "before_ioctl": ("B", f"file_name {_IOCTL} {_CTX}"),
    "after_ioctl": ("A", f"file_name {_IOCTL} {_CTX}"),
    "notify_ioctl": ("N", f"file_name {_IOCTL}"),
    "before_filter_attach_to_volume": ("O", "volume_name skip_volume"),
    "after_filter_attach_to_volume": ("O", "volume_name"),
    "after_filter_detach_from_volume": ("O", "volume_name"),
    "notify_filter_attach_to_volume": ("O", "volume_name"),
    "notify_filter_detach_from_volume": ("O", "volume_name"),
    "filter_start": ("O", ""),
    "filter_stop": ("O", ""),
    "reparse_file_name": ("O", "file_name reparsed_name"),
    "reparse_with_tag": ("O", "file_name reparse_tag reparse_buffer reparse_buffer_length reissue_io"),
    "error": ("O", "error_code description"),
    "worker_thread_creation": ("O", ""),
    "worker_thread_termination": ("O", ""),
}

_DEFAULTS: dict[str, Any] = {
    "result_code": 0, "process_request": True, "status": 0, "file_context": 0, "handle_context": 0,
    "directory_context": 0, "enumeration_context": 0, "buffer": None, "buffer_length": 0, "buffer_view": None,
    "share_mode": 7, "virtual_file": False, "isolate": False, "backend_file_name": "", "skip_volume": False,
    "reissue_io": False, "can_delete": True, "replace_if_exists": True, "flags": 0, "mode": 0,
    "security_descriptor": b"", "length": 0, "length_needed": 0, "owner": -1, "group": -1, "attributes": 0,
    "creation_time": None, "last_access_time": None, "last_write_time": None, "change_time": None,
}


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _make(prefix: str, event: str, kind: str, fields: str) -> type[EventParams]:
    names = fields.split()
    if kind == "B":
        names.append("process_request")
    if kind in ("A", "N"):
        names.append("status")
    names.append("result_code")
    unique = tuple(dict.fromkeys(names))
    defaults = {n: _DEFAULTS.get(n, 0 if n not in ("file_name", "new_file_name", "link_name", "directory_name",
                                                     "volume_name", "description", "ea_name", "reparsed_name",
                                                     "file_name_mask") else "") for n in unique}
    cls = type(f"{prefix}{_camel(event)}EventParams", (EventParams,),
               {"__slots__": unique, "_defaults": defaults, "__module__": __name__})
    return cls


make_params = _make  # (class prefix, event, kind, fields): other classes' parameter classes

FILTER_PARAMS: dict[str, type[EventParams]] = {
    event: _make("CBFilter", event, kind, fields) for event, (kind, fields) in EVENTS.items()
}
globals().update({cls.__name__: cls for cls in FILTER_PARAMS.values()})
