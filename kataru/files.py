"""Reading and writing the files kataru reads and writes: one way to read JSON and JSONL with a one-line
error that names the file and the fix, and one way to write a file or a folder atomically (a temporary
name, then a rename), so that an interrupted write never leaves half a file where a whole one was.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from kataru.errors import KataruError


def read_json(path: Path, fix: str, default: Any = None, kind: type = dict) -> Any:
    """The JSON value in `path` (`default` when the file is absent and a default is given).

    `fix` ends the error message: what the user should do about a broken file. A value of another type
    than `kind` (an array where an object belongs) is refused the same way.
    """
    if not path.is_file():
        if default is not None:
            return default
        if path.exists():
            raise KataruError(f"{path} is a directory, not a file; {fix}")
        raise KataruError(f"{path} does not exist; {fix}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KataruError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); {fix}") from None
    except UnicodeDecodeError:
        raise KataruError(f"{path} is not UTF-8 text; {fix}") from None
    except OSError as err:
        raise KataruError(f"cannot read {path} ({err.strerror}); {fix}") from None
    if not isinstance(value, kind):
        raise KataruError(f"{path} holds a JSON {type(value).__name__}, not a JSON "
                          f"{'object' if kind is dict else kind.__name__}; {fix}")
    return value


def open_text(path: Path) -> IO[str]:
    """A UTF-8 text file, gzip-compressed when it ends in .gz."""
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def check_input(path: Path, what: str = "data file", fix: str | None = None) -> Path:
    """An input file that exists and is a file, or a one-line error saying which it is not."""
    if path.is_dir():
        raise KataruError(f"{what} {path} is a directory; give a file" + (f" ({fix})" if fix else ""))
    if not path.is_file():
        raise KataruError(f"{what} {path} does not exist" + (f"; {fix}" if fix else ""))
    return path


def iter_jsonl(path: Path, fix: str = "one JSON object per line") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a .jsonl or .jsonl.gz file."""
    check_input(path, fix=None if fix == "one JSON object per line" else fix)
    try:
        with open_text(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise KataruError(f"{path}:{number} is not valid JSON ({err.msg}); {fix}") from None
                if not isinstance(row, dict):
                    raise KataruError(f"{path}:{number} is not a JSON object; {fix}")
                yield number, row
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise KataruError(f"cannot read {path} ({err}); the file is truncated or not UTF-8 JSONL") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSONL file, each with `_where` (file:line) for messages about it; never empty."""
    rows = [row | {"_where": f"{path}:{number}"} for number, row in iter_jsonl(path)]
    if not rows:
        raise KataruError(f"{path} holds no examples; the dataset is empty")
    return rows


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write the whole file under a temporary name, flush it to disk, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, value: Any, indent: int | None = 2) -> None:
    write_atomic(path, json.dumps(value, ensure_ascii=False, indent=indent) + "\n")


@contextmanager
def atomic_output(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file to stream into under a temporary name; renamed into place when the block ends without an error
    and removed when it does not (a failed run leaves no `*.tmp` behind)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def replace_dir_atomic(final: Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary folder beside `final`, flush it to disk, then rename it into final's place: a folder
    under `final`'s name is always whole (an old `final` is renamed aside first and removed after; killed in
    between, it is still there as `.old-NAME`). A failed or killed fill leaves no `final` and no half of one."""
    tmp, old = final.with_name(f".tmp-{final.name}"), final.with_name(f".old-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def data_folder(name: str | None = None) -> Path:
    """Where real data sets live: $KATARU_DATA, else a `shared/data` folder beside the working directory or
    the source checkout (this repository's layout). `name` is a subfolder that must exist."""
    candidates = [Path(os.environ["KATARU_DATA"])] if os.environ.get("KATARU_DATA") else []
    candidates += [root.parent / "shared" / "data" for root in (Path.cwd(), Path(__file__).resolve().parents[1])]
    for folder in candidates:
        if folder.is_dir() and (name is None or (folder / name).exists()):
            return folder
    wanted = f"a data folder with {name}/" if name else "a data folder"
    raise KataruError(f"no {wanted} found; set KATARU_DATA to the folder holding the data sets, or pass the "
                      "file explicitly")
