#!/usr/bin/env python3
"""Made the frozen example files of format version 1 (run once, 2026-12-08; never again for version 1: the files
are the test of what readers must read forever). A new format version gets a new script and new files.

    .venv/bin/python tests/data/crypto/make_frozen.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "src"))

from fsfilter._crypto import fileformat as ff  # noqa: E402

MACHINE_KEY = bytes(range(32))
RECOVERY_KEY = hashlib.sha256(b"recovery key of the frozen files").digest()
GLOBAL_SALT = b"frozen-files-v1!"


def plaintext(n: int) -> bytes:
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(i.to_bytes(8, "little")).digest()
        i += 1
    return out[:n]


CASES = [
    # name, algorithm, chunk shift, plaintext size, secrets
    ("v1-aes-gcm-multi-chunk", ff.AES_256_GCM, 12, 3 * 4096 + 100, ["password"]),
    ("v1-chacha-exact-chunks", ff.CHACHA20_POLY1305, 12, 2 * 4096, ["password"]),
    ("v1-empty", ff.AES_256_GCM, 16, 0, ["password"]),
    ("v1-three-slots", ff.AES_256_GCM, 16, 70000, ["password", "machine", "recovery"]),
]


def main() -> None:
    index = {}
    for name, algorithm, shift, size, kinds in CASES:
        secrets = []
        for kind in kinds:
            if kind == "password":
                secrets.append(ff.Secret.password("correct horse battery staple", GLOBAL_SALT))
            elif kind == "machine":
                secrets.append(ff.Secret.key(MACHINE_KEY, ff.KIND_MACHINE))
            else:
                secrets.append(ff.Secret.key(RECOVERY_KEY, ff.KIND_RECOVERY))
        header = ff.new_header(secrets, algorithm, shift, log2_n=10)
        data = plaintext(size)
        body = b"".join(ff.ChunkCipher(header).encrypt(data))
        (HERE / f"{name}.fse").write_bytes(header.encode() + body)
        index[name] = {"plaintext_size": size, "plaintext_sha256": hashlib.sha256(data).hexdigest(),
                       "algorithm": algorithm, "chunk_shift": shift, "slots": kinds}
    index["_secrets"] = {"password": "correct horse battery staple", "global_salt_hex": GLOBAL_SALT.hex(),
                         "machine_key_hex": MACHINE_KEY.hex(), "recovery_key_hex": RECOVERY_KEY.hex()}
    (HERE / "frozen.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if any((HERE / f"{name}.fse").exists() for name, *_ in CASES) and "--force" not in sys.argv:
        sys.exit("the frozen files exist: they are not to be made again (--force only for a broken first run)")
    main()
