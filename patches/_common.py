"""Helpers shared by the patch modules: version guard and an "already applied" marker."""
import warnings
from importlib.metadata import PackageNotFoundError, version

_MARK = "_seqpipe_patch"


def mark(fn):
    """Tag a replacement function so a second apply() can see the patch is already in place."""
    setattr(fn, _MARK, True)
    return fn


def is_marked(fn):
    return getattr(fn, _MARK, False)


def warn_if_unverified(patch, dist, verified):
    """Warn once per apply when `dist`'s major.minor is not in `verified` (the patch still applies)."""
    try:
        found = version(dist)
    except PackageNotFoundError:
        found = "unknown"
    if ".".join(found.split(".")[:2]) not in verified:
        warnings.warn(f"seqpipe_ds patch {patch!r} was checked against {dist} {', '.join(verified)}.x, "
                      f"not {found}: applying it unverified", stacklevel=3)
