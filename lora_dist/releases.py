"""Which release of a dependency is installed, as a tuple that compares: lora_dist adapts to a few releases' known
behaviour (DeepSpeed's ZeRO-3 recompute before 0.19.3, PEFT's reading of expert-named layers before 0.22)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["installed", "release"]


def release(text: str) -> tuple[int, ...]:
    """The first three numbers of a release string, each part's digits only: ``"0.19.3+cu121"`` -> ``(0, 19, 3)``,
    ``"0.23.0.dev0"`` -> ``(0, 23, 0)``."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def installed(package: str) -> tuple[int, ...] | None:
    """The :func:`release` of the installed distribution ``package``; None where it is not installed."""
    try:
        return release(version(package))
    except PackageNotFoundError:
        return None
