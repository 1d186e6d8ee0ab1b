"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from seqscope.capture import native


def skip_or_fail(message: str) -> None:
    """Skips a test that needs what ``message`` says is missing, and fails it
    instead where SEQSCOPE_REQUIRE_NATIVE=1 (CI, which must run them all)."""
    if os.environ.get("SEQSCOPE_REQUIRE_NATIVE") == "1":
        pytest.fail(message)
    pytest.skip(message)


def need_native() -> None:
    """skip_or_fail without the compiled library (capture.native)."""
    if not native.enabled():
        skip_or_fail(native.status())


@pytest.fixture(params=["compiled", "eager"])
def scan_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Runs a test once with the compiled BPTT scan (capture.native) and once
    with the eager PyTorch one (and sigma_max by torch.linalg.eigvalsh instead
    of native.top_eigenvalue), and checks afterwards that the path asked for
    is the one that ran. Without a C compiler the compiled run skips locally,
    and fails where SEQSCOPE_REQUIRE_NATIVE=1 (CI)."""
    calls = []
    # load (and self-test) the compiled passes before counting: the self-test calls them
    native.enabled()
    compiled = native.backward_scan

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return compiled(*args, **kwargs)

    if request.param == "compiled":
        need_native()
        monkeypatch.setattr(native, "backward_scan", counting)
    else:
        monkeypatch.setattr(native, "supports", lambda ext_h: False)
        monkeypatch.setattr(native, "backward_scan", counting)
        # sigma_max as without a compiler too: the dense eigensolver
        monkeypatch.setattr(native, "top_eigenvalue", lambda gram, loaded=None, threads=None: None)
    yield request.param
    if request.param == "compiled":
        assert calls, "the compiled scan never ran"
    else:
        assert not calls, "the compiled scan ran although the eager one was asked for"
