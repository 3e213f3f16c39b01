"""Deployment for every SDK class: install, uninstall, get_driver_status, get_driver_version, and the kernel features
each class needs.

On the SDK's host system ``install`` copies a driver and registers it per product. Here the "driver" is the
kernel's FUSE, fanotify and process connector, run by the fsfilterd service: ``install`` checks the kernel
features the class needs (and says what is missing), installs the service's unit and directories, enables it
when systemd runs, and records the product under /var/lib/fsfilter/products; ``uninstall`` removes the product's
record, and the service only when no product remains, as the SDK's per-product registry entries do.
"""

from __future__ import annotations

import errno
import functools
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fsfilter._abi import fanotify as fan_abi
from fsfilter._system import fanotify, fuse_device, netlink
from fsfilter.api import _control, _rulesfiles
from fsfilter.api import constants as c
from fsfilter.errors import CBFSFilterError

__all__ = ["Deployment", "kernel_features", "package_version", "unit_text"]

UNIT_NAME = "fsfilterd.service"
SOCKET_NAME = "fsfilterd.socket"

# What each class needs of the kernel (names as kernel_features reports them).
NEEDS: dict[str, tuple[str, ...]] = {
    "CBFilter": ("fuse", "fuse_passthrough"),
    "CBMonitor": ("fanotify_fid",),
    "CBProcess": ("process_connector", "fanotify_permission"),
}


def package_version() -> str:
    try:
        return importlib.metadata.version("fsfilter")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def version_number(text: str) -> int:
    """A dotted version as the SDK's 64-bit number: four 16-bit parts, most significant first."""
    parts = [int(p) if p.isdigit() else 0 for p in text.split("+")[0].split("-")[0].split(".")[:4]]
    parts += [0] * (4 - len(parts))
    return (parts[0] << 48) | (parts[1] << 32) | (parts[2] << 16) | parts[3]


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    try:
        return (int(release[0]), int(release[1])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def _fanotify_ok(flags: int) -> bool:
    try:
        fd = fanotify.init(flags, os.O_RDONLY)
    except OSError:
        return False
    os.close(fd)
    return True


@functools.lru_cache(maxsize=1)
def _kernel_features() -> tuple[tuple[str, bool], ...]:
    return tuple(_probe_kernel().items())


def kernel_features() -> dict[str, bool]:
    """What this kernel offers fsfilter (probed once per process)."""
    return dict(_kernel_features())


def _probe_kernel() -> dict[str, bool]:
    """Tried for real where trying is cheap and harmless."""
    fuse = os.path.exists(fuse_device.DEVICE)
    try:
        sock = netlink.open_proc_connector(0.1)
        netlink.close_proc_connector(sock)
        connector = True
    except OSError:
        connector = False
    return {
        "fuse": fuse,
        "fuse_passthrough": fuse and _kernel_at_least(6, 9),  # FUSE_PASSTHROUGH; the INIT reply confirms it
        "fuse_notify_resend": fuse and _kernel_at_least(6, 9),
        "fanotify_permission": _fanotify_ok(fan_abi.FAN_CLASS_CONTENT | fan_abi.FAN_CLOEXEC),
        "fanotify_fid": _fanotify_ok(fan_abi.FAN_CLASS_NOTIF | fan_abi.FAN_REPORT_DFID_NAME | fan_abi.FAN_CLOEXEC),
        "fanotify_pre_content": _fanotify_ok(fan_abi.FAN_CLASS_PRE_CONTENT | fan_abi.FAN_CLOEXEC)
        and _kernel_at_least(6, 14),
        "process_connector": connector,
    }


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")


def unit_text(socket_unit: bool = False) -> str:
    """The unit files shipped with the package (also installed by ``install``)."""
    here = Path(__file__).resolve().parent.parent / "data"
    return (here / (SOCKET_NAME if socket_unit else UNIT_NAME)).read_text()


class Deployment:
    """The SDK's deployment members, shared by every class (``_CLASS`` names the class for its kernel needs)."""

    _CLASS = "CBFilter"

    def install(self, cab_file_name: str, product_guid: str, path_to_install: str | None, *args: object) -> bool:
        """Check the kernel features this class needs, install and enable fsfilterd, record the product. Returns
        whether a reboot is needed (never, on Linux: nothing here needs one). The SDK's trailing parameters
        (altitude, flags, allowed callers; the process and registry classes have no altitude) are accepted."""
        product = _check_product(product_guid)
        if os.geteuid() != 0:
            raise CBFSFilterError(errno.EPERM, "install needs root: it installs the fsfilterd service")
        features = kernel_features()
        missing = [f for f in NEEDS.get(self._CLASS, ()) if not features.get(f)]
        if missing:
            raise CBFSFilterError(errno.ENODEV, f"{self._CLASS} needs kernel features this kernel lacks: "
                                                f"{', '.join(missing)} ({_HOW_TO_GET.get(missing[0], '')})")
        base = _rulesfiles.root()
        for d in ("/etc/fsfilter/rules.d", "/var/lib/fsfilter/products"):
            Path(base + d).mkdir(parents=True, exist_ok=True)
        units = Path(path_to_install or (base + "/etc/systemd/system"))
        units.mkdir(parents=True, exist_ok=True)
        for name, socket_unit in ((UNIT_NAME, False), (SOCKET_NAME, True)):
            text = unit_text(socket_unit).replace("@FSFILTERD@", shutil.which("fsfilterd") or
                                                  f"{sys.executable} -m fsfilter.service")
            _rulesfiles.write_text_atomic(units / name, text)
        record = {"product": product_guid, "class": self._CLASS, "installed": time.time(),
                  "version": package_version(), "cab_file_name": cab_file_name, "units": str(units)}
        _rulesfiles.write_text_atomic(_products_dir() / f"{product}.json", json.dumps(record, indent=1) + "\n")
        if systemd_running() and not base and path_to_install is None:
            for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", UNIT_NAME]):
                done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
                if done.returncode != 0:
                    raise CBFSFilterError(errno.EIO, f"{' '.join(argv)} failed: {done.stderr.strip()}")
        return False

    def uninstall(self, cab_file_name: str, product_guid: str, installed_path: str | None, flags: int = 0) -> bool:
        """Forget the product; remove the service (unit files) only when no other product remains. Default rules
        of the product stay in /etc/fsfilter/rules.d (the administrator's) unless UNINSTALL_VERSION_ALL is given."""
        product = _check_product(product_guid)
        if os.geteuid() != 0:
            raise CBFSFilterError(errno.EPERM, "uninstall needs root")
        record_path = _products_dir() / f"{product}.json"
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        record_path.unlink(missing_ok=True)
        if flags & c.UNINSTALL_VERSION_ALL == c.UNINSTALL_VERSION_ALL:
            _rulesfiles.product_file(product_guid).unlink(missing_ok=True)
        if installed_products():
            return False
        units = Path(installed_path or record.get("units") or (_rulesfiles.root() + "/etc/systemd/system"))
        if systemd_running() and not _rulesfiles.root() and installed_path is None:
            subprocess.run(["systemctl", "disable", "--now", UNIT_NAME, SOCKET_NAME], capture_output=True, timeout=60)
        for name in (UNIT_NAME, SOCKET_NAME):
            (units / name).unlink(missing_ok=True)
        if systemd_running() and not _rulesfiles.root():
            subprocess.run(["systemctl", "daemon-reload"], capture_output=True, timeout=60)
        return False

    def get_driver_status(self, product_guid: str) -> int:
        """MODULE_STATUS_RUNNING when fsfilterd answers; STOPPED when the product is installed but the service does
        not run; with nothing installed, RUNNING when the kernel can run this class's filters in the application
        itself (the embedded mode, which needs no service), else NOT_PRESENT."""
        try:
            _control.call("hello", timeout=2.0)
            return c.MODULE_STATUS_RUNNING
        except CBFSFilterError:
            pass
        if installed_products():
            return c.MODULE_STATUS_STOPPED
        features = kernel_features()
        if all(features.get(f) for f in NEEDS.get(self._CLASS, ())[:1]):
            return c.MODULE_STATUS_RUNNING
        return c.MODULE_STATUS_NOT_PRESENT

    def get_driver_version(self, product_guid: str) -> int:
        """The fsfilter package's version as four 16-bit parts (major, minor, patch, build)."""
        return version_number(package_version())


_HOW_TO_GET = {
    "fuse": "load the fuse module: modprobe fuse",
    "fuse_passthrough": "FUSE passthrough needs Linux 6.9 or later with CONFIG_FUSE_PASSTHROUGH",
    "fanotify_fid": "fanotify with FID reporting needs Linux 5.9 or later and CONFIG_FANOTIFY",
    "fanotify_permission": "needs CONFIG_FANOTIFY_ACCESS_PERMISSIONS",
    "process_connector": "needs CONFIG_PROC_EVENTS and CAP_NET_ADMIN",
}


def _check_product(product_guid: str) -> str:
    return _rulesfiles.product_file(product_guid).stem


def _products_dir() -> Path:
    return Path(_rulesfiles.root() + "/var/lib/fsfilter/products")


def installed_products() -> list[str]:
    try:
        return sorted(p.stem for p in _products_dir().glob("*.json"))
    except OSError:
        return []
