"""The kernel's process connector (include/uapi/linux/cn_proc.h, connector.h, netlink.h)."""

from __future__ import annotations

import struct

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

PROC_EVENT_NONE = 0
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
PROC_EVENT_UID = 0x4
PROC_EVENT_GID = 0x40
PROC_EVENT_SID = 0x80
PROC_EVENT_PTRACE = 0x100
PROC_EVENT_COMM = 0x200
PROC_EVENT_COREDUMP = 0x40000000
PROC_EVENT_EXIT = 0x80000000

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
EVENT_HEADER = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
BODY_OFFSET = NLMSGHDR.size + CN_MSG.size + EVENT_HEADER.size  # 52
FORK = struct.Struct("=4i")  # parent pid, parent tgid, child pid, child tgid
EXEC = struct.Struct("=2i")  # pid, tgid
EXIT = struct.Struct("=2i2I2i")  # pid, tgid, exit code, exit signal, parent pid, parent tgid
COMM = struct.Struct("=2i16s")  # pid, tgid, comm
