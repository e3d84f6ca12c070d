"""Which braindino this is: its version, the git commit of a source checkout, and the key libraries' versions.

Recorded in every training checkpoint's provenance (and from there in every exported model) and printed by
``braindino --version``. Nothing here imports torch or runs a subprocess: the commit is read from ``.git`` files.
"""

import platform
import re
from importlib import metadata
from pathlib import Path

from braindino import __version__

SOURCE_ROOT = Path(__file__).resolve().parents[1]
_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")


def git_commit(root: Path = SOURCE_ROOT):
    """The commit checked out in ``root`` when it is a git clone of braindino, else ``None`` (an installed wheel).

    Reads HEAD and the ref it names (loose or packed, also in a worktree); never raises.
    """
    try:
        setup = root / "setup.cfg"
        if not setup.is_file() or "name = braindino" not in setup.read_text(encoding="utf-8"):
            return None
        git = root / ".git"
        if git.is_file():   # a worktree or submodule: ".git" holds "gitdir: PATH"
            git = (root / git.read_text(encoding="utf-8").partition("gitdir:")[2].strip()).resolve()
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref:"):
            return head if _SHA.fullmatch(head) else None   # detached HEAD
        ref = head.partition("ref:")[2].strip()
        common = git / "commondir"
        common = (git / common.read_text(encoding="utf-8").strip()).resolve() if common.is_file() else git
        for folder in dict.fromkeys((git, common)):
            if (folder / ref).is_file():
                sha = (folder / ref).read_text(encoding="utf-8").strip()
                return sha if _SHA.fullmatch(sha) else None
        packed = common / "packed-refs"
        lines = packed.read_text(encoding="utf-8").splitlines() if packed.is_file() else []
        for line in lines:
            sha, _, name = line.partition(" ")
            if name == ref and _SHA.fullmatch(sha):
                return sha
    except (OSError, UnicodeDecodeError):
        return None
    return None


def library_version(distribution: str):
    """The installed version of ``distribution`` (e.g. ``"torch"``), ``None`` when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """``{braindino, git_commit, torch, timm, python}``: strings, ``git_commit`` ``None`` outside a clone."""
    return {"braindino": __version__, "git_commit": git_commit(), "torch": library_version("torch"),
            "timm": library_version("timm"), "python": platform.python_version()}


def version_line() -> str:
    """One line for ``braindino --version``.

    E.g. ``braindino 0.1.0 (git 13eed9b1c2a4); torch 2.5.1, timm 1.0.31, Python 3.11.7``.
    """
    info = versions()
    commit = f" (git {info['git_commit'][:12]})" if info["git_commit"] else ""
    return (f"braindino {info['braindino']}{commit}; torch {info['torch']}, timm {info['timm']}, "
            f"Python {info['python']}")
