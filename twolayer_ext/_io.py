"""Output files written whole: a reader (or a run killed mid-write) never sees half a file."""

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union


def write_atomic(path: Union[str, os.PathLike], write_bytes: Callable[[BinaryIO], object]) -> None:
    """write_bytes(file) into a temporary file beside path, then rename it over path."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write_bytes(f)
        umask = os.umask(0)  # mkstemp makes 0600; give the file the mode open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
