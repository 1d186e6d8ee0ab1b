"""Which training steps to record: plain ``int -> bool`` functions."""

from __future__ import annotations

from collections.abc import Callable

Schedule = Callable[[int], bool]


def every(n: int) -> Schedule:
    """Record steps 0, n, 2n, ..."""
    if n < 1:
        raise ValueError(f"every must be >= 1, got {n}")

    def schedule(step: int) -> bool:
        return step % n == 0

    schedule.__name__ = f"every({n})"
    return schedule


def dense_early(n: int = 50, dense_until: int = 100, medium_until: int = 1000) -> Schedule:
    """Every step below ``dense_until`` (explosions tend to start early), every
    ``max(1, n // 5)``-th below ``medium_until``, then every ``n``-th."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    medium = max(1, n // 5)

    def schedule(step: int) -> bool:
        if step < dense_until:
            return True
        if step < medium_until:
            return step % medium == 0
        return step % n == 0

    schedule.__name__ = f"dense_early({n})"
    return schedule


PRESETS: dict[str, Callable[[], Schedule]] = {
    "dense-early": dense_early,
    "always": lambda: every(1),
}


def resolve(spec: int | str | Schedule) -> Schedule:
    """An ``every=`` argument as a schedule."""
    if isinstance(spec, bool):
        raise ValueError("every must be an int, a preset name or a function of the step")
    if isinstance(spec, int):
        return every(spec)
    if isinstance(spec, str):
        try:
            return PRESETS[spec]()
        except KeyError:
            raise ValueError(f"unknown schedule preset {spec!r}; presets: {sorted(PRESETS)}") from None
    if callable(spec):
        return spec
    raise ValueError(f"every must be an int, a preset name or a function of the step, got {spec!r}")
