"""CBEncrypt's on-disk format (docs/file-format.md): headers, key slots and chunks, as pure functions over bytes.

No file system calls and no FUSE here, so that the format can be tested alone, against frozen files, and read by
tools that have nothing to do with a mount.
"""
