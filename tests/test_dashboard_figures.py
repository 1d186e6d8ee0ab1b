"""Figure builders and the dashboard's data source, without a browser."""

from __future__ import annotations

import numpy as np
import pytest

from seqscope.dashboard import TraceSource, create_app, figures
from tests.dashboard_trace import make_trace


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    return make_trace(tmp_path_factory.mktemp("dash") / "t.h5")


def test_heatmap_shows_and_counts_nonfinite_and_masks_padding():
    z = np.arange(12, dtype=float).reshape(3, 4)
    z[0, 1] = np.nan
    z[2, 3] = np.inf
    mask = np.zeros_like(z, bool)
    mask[1, 3] = True  # padding
    z[1, 3] = np.nan  # padding content never counts
    fig = figures.heatmap(z, mask=mask, title="t")
    assert "NaN 1, Inf 1" in fig.layout.title.text and "padding masked" in fig.layout.title.text
    main, overlay = fig.data
    shown = np.asarray(main.z, dtype=float)
    assert np.isnan(shown[1, 3]) and np.isnan(shown[0, 1]) and shown[0, 0] == 0
    flags = np.asarray(overlay.z, dtype=float)
    assert flags[0, 1] == 1 and flags[2, 3] == 1 and np.isnan(flags[1, 3]) and np.isnan(flags[0, 0])
    assert overlay.colorscale[0][1] == figures.NONFINITE_COLOUR


def test_reduce_grid_keeps_nonfinite_visible():
    z = np.ones((1000, 1000))
    z[500, 500] = np.inf
    reduced, fr, fc = figures.reduce_grid(z, max_cells=10_000)
    assert reduced.size <= 10_000 and fr * fc >= 100
    assert np.isinf(reduced).sum() == 1
    assert np.allclose(reduced[np.isfinite(reduced)], 1.0)


def test_overview_marks_nonfinite_loss():
    steps = np.arange(6)
    loss = np.array([1.0, 0.5, np.nan, np.inf, 0.2, 0.1])
    fig = figures.overview_figure((steps, loss), None, [{"severity": "error", "kind": "nonfinite",
                                                        "first_step": 2, "last_step": 3}], current_step=4)
    names = [t.name for t in fig.data]
    assert "loss: NaN/Inf (2)" in names
    assert fig.layout.shapes[0].x0 == 4  # the step marker comes first


def test_source_grad_matrix_and_findings(trace_path):
    src = TraceSource(str(trace_path))
    steps, norms, mask = src.grad_matrix("lstm.l1")
    assert list(steps) == list(range(16)) and norms.shape == (16, 70) and not mask.any()
    with np.errstate(all="ignore"):
        expected = np.median(src.trace.grad_norms("lstm.l1", 5)["hidden"], axis=0)
    np.testing.assert_allclose(norms[5], expected)
    found = src.wait_for_findings()
    kinds = {(f["kind"], f["layer"]) for f in found}
    assert ("vanishing_gradient", "lstm.l1") in kinds
    assert any(f["kind"] == "exploding_gradient" and f["first_step"] == 12 for f in found)
    assert src.check_layer("../../etc/passwd") == "lstm.l0"  # nothing from the browser is a path


def test_app_builds_and_serves_index(trace_path):
    app = create_app(str(trace_path))
    client = app.server.test_client()
    page = client.get("/")
    assert page.status_code == 200 and b"seqscope" in page.data
    layout = client.get("/_dash-layout").get_json()
    assert "lstm.l1" in str(layout)
