"""The (cross) compilers that link tvmq's libraries: find them, or say how to install them."""

from __future__ import annotations

import os
import re
import shutil

from tvmq.errors import TvmqError

_TRIPLE_COMPILER = re.compile(r"^(?P<triple>[\w.]+-[\w.]+-[\w.]+)-(?P<tool>g\+\+|gcc|c\+\+|cc)$")


def find_compiler(cc: str, preset_name: str) -> str:
    """The full path of ``cc``, or a TvmqError saying which Debian package provides it."""
    found = shutil.which(cc)
    if found is not None:
        return found
    package = debian_package(cc)
    if package is not None:
        hint = f"install it with `apt-get install {package}` (Debian/Ubuntu)"
    else:
        hint = "install it or change the preset's cc"
    raise TvmqError(
        f"target {preset_name!r} links with the cross compiler {cc!r}, which is not on PATH: {hint}"
    )


def debian_package(cc: str) -> str | None:
    """The Debian package of a ``<triple>-g++``/``-gcc`` cross compiler (``g++-<triple>``)."""
    match = _TRIPLE_COMPILER.match(os.path.basename(cc))
    if match is None:
        return None
    tool = {"c++": "g++", "cc": "gcc"}.get(match["tool"], match["tool"])
    return f"{tool}-{match['triple'].replace('_', '-')}"
