"""One run per `output_dir`: `surogate train` holds an exclusive lock on `output_dir/.surogate.lock`.

Two runs writing into one folder overwrite each other's base model, checkpoints and metrics; the second
one is refused at once instead, with the first one's pid. The lock is `fcntl.flock` on the file, which
the kernel releases when the process ends however it ends, so a lock file left by a run that died (its
pid written in it) is simply taken over. The file is removed when the run ends; the inode check in
`hold` keeps a run that opened the file just before that removal from holding a lock nobody sees.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from surogate.training.config import ConfigError

LOCK_FILE = ".surogate.lock"


def _holder(path: Path) -> str:
    """Who holds the lock, as its file says (pid and host), for the error line."""
    try:
        pid, _, host = path.read_text().strip().partition(" ")
    except OSError:
        return "another process"
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


@contextlib.contextmanager
def hold(output_dir: "str | os.PathLike") -> Iterator[Path]:
    """Hold `output_dir`'s lock while the block runs (the folder is created, and removed again when the
    run leaves it empty); a ConfigError naming the holder when another live process has it."""
    out = Path(output_dir).expanduser()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"output_dir: {str(out)!r} is in use by another surogate train ({_holder(path)}); "
                              "wait for it to end, or write to another output_dir") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # removed by the run that just ended: lock the new file instead
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if the run wrote nothing there
