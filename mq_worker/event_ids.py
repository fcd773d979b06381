"""Event ids: random UUIDs (version 4) drawn from a pool of random bytes.

`uuid4()` asks the kernel for 16 random bytes at every call, a system call per
event, three per run. The pool asks for 4 KiB at a time (256 ids) from the same
source (os.urandom), and is emptied in a forked child so no two processes hand
out the same ids.
"""

from __future__ import annotations

import os

_POOL_BYTES = 4096
_pool = b""
_offset = 0
_VARIANT = "89ab"


def new_event_id() -> str:
    """A random UUID (version 4, RFC 4122 variant) in its usual string form."""
    global _pool, _offset
    if _offset >= len(_pool):
        _pool, _offset = os.urandom(_POOL_BYTES), 0
    digits = _pool[_offset:_offset + 16].hex()
    _offset += 16
    return (f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-"
            f"{_VARIANT[int(digits[16], 16) & 3]}{digits[17:20]}-{digits[20:]}")


def _forget_pool() -> None:
    global _pool, _offset
    _pool, _offset = b"", 0


os.register_at_fork(after_in_child=_forget_pool)
