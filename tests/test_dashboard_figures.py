"""Figure builders and the dashboard's data source, without a browser."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from seqscope.dashboard import TraceSource, create_app, figures
from tests.dashboard_trace import make_trace


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    return make_trace(tmp_path_factory.mktemp("dash") / "t.h5")


def _checked(fig: dict) -> go.Figure:
    """A builder's figure (a plain dict, as Dash sends it) through plotly's own
    validation, which raises on any property or value plotly.js does not know;
    the tests read it through the go.Figure."""
    assert set(fig) <= {"data", "layout"}
    return go.Figure(fig)


def test_heatmap_shows_and_counts_nonfinite_and_masks_padding():
    z = np.arange(12, dtype=float).reshape(3, 4)
    z[0, 1] = np.nan
    z[2, 3] = np.inf
    mask = np.zeros_like(z, bool)
    mask[1, 3] = True  # padding
    z[1, 3] = np.nan  # padding content never counts
    fig = _checked(figures.heatmap(z, mask=mask, title="t"))
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
    found = [{"severity": "error", "kind": "nonfinite", "first_step": 2, "last_step": 3}]
    fig = _checked(figures.overview_figure((steps, loss), None, found, current_step=4))
    names = [t.name for t in fig.data]
    assert "loss: NaN/Inf (2)" in names
    assert fig.layout.shapes[0].x0 == 4  # the step marker comes first
    assert (fig.layout.shapes[1].x0, fig.layout.shapes[1].type) == (2, "rect")  # then the finding
    # the dashboard asks for no marker (it draws its own over the figure)
    assert [s.type for s in _checked(figures.overview_figure((steps, loss), None, found)).layout.shapes] == ["rect"]


def _values_of(key, tree):
    """Every value stored under ``key`` anywhere in a figure's nested dicts and lists."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                yield v
            else:
                yield from _values_of(key, v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _values_of(key, v)


def test_every_figure_builder_gives_a_figure_plotly_accepts():
    """The builders return plain dicts (what Dash sends); plotly's validation,
    which a go.Figure would have applied on the server, runs here on each of them."""
    rng = np.random.default_rng(0)
    steps = np.arange(0, 50, 5)
    norms = rng.uniform(1e-6, 1.0, (len(steps), 12))
    norms[3, 4] = np.inf
    mask = np.zeros(norms.shape, bool)
    mask[:, 10:] = True
    gates = {"reset": np.ma.masked_array(rng.uniform(0, 1, (2, 12, 3))),
             "new": np.ma.masked_array(rng.uniform(-1, 1, (2, 12, 3))),
             "odd": np.ma.masked_array(rng.uniform(-3, 3, (2, 12, 3)))}
    profile = np.ma.masked_array(rng.uniform(1e-8, 1.0, (2, 12)))
    profile[1, 2] = np.nan
    built = [
        figures.heatmap(rng.normal(size=(3, 12)), title="h", x_title="timestep", y_title="unit", zmid=0.0),
        figures.heatmap(np.abs(rng.normal(size=(3, 12))), title="log", log=True, colorscale="Viridis"),
        figures.gradient_flow_figure(steps, norms, mask, "gru.l0"),
        figures.gradient_flow_figure(steps, norms, mask, "gru.l0", current_step=15),
        figures.overview_figure((steps, rng.uniform(0.1, 1, len(steps))), (steps, rng.uniform(1, 2, len(steps))),
                                [{"severity": "warning", "first_step": 5, "last_step": 5}], current_step=10),
        figures.overview_figure(None, None),
        figures.propagation_figure(profile, 1, "gru.l0", 15),
        figures.saturation_figure(gates),
        figures.gates_figure(gates, 0),
        figures.empty_figure("no recorded steps yet"),
    ]
    for fig in built:
        checked = _checked(fig)
        assert checked.layout.title.text is not None
        sent = figures.to_dict(fig)
        assert sent["layout"]["template"] and "template" not in fig["layout"]  # the builder's dict is not changed
    # colour scales go as [position, colour] pairs: plotly.js draws another scale for a name it does
    # not know (plotly.py's "RdBu_r" drew grey for 0 in the states and pink-green in the gates)
    scales = [scale for fig in built for scale in _values_of("colorscale", fig)]  # the template's are pairs
    assert len(scales) >= 8
    for scale in scales:
        assert isinstance(scale, list) and all(len(pair) == 2 and isinstance(pair[1], str) for pair in scale), scale
        assert scale[0][0] == 0 and scale[-1][0] == 1
    states = figures.to_dict(built[0])["data"][0]["colorscale"]
    assert states[len(states) // 2] == [0.5, "rgb(247,247,247)"]  # ColorBrewer's RdBu: white at 0
    assert "rgb(103,0,31)" in states[-1][1]  # reversed: dark red for the largest values
    flow = _checked(built[3])
    assert [t.type for t in flow.data] == ["heatmap", "heatmap"]  # the values, and the Inf overlay
    assert flow.layout.shapes[0].x0 == 15 and not _checked(built[2]).layout.shapes


def test_source_grad_matrix_and_findings(trace_path):
    src = TraceSource(str(trace_path))
    steps, norms, mask = src.grad_matrix("lstm.l1")
    assert list(steps) == list(range(16)) and norms.shape == (16, 70) and not mask.any()
    hidden = src.trace.grad_norms("lstm.l1", 5)["hidden"]
    assert not np.ma.getmaskarray(hidden).any()  # no padding in this trace: a plain median
    with np.errstate(all="ignore"):
        expected = np.median(hidden.data, axis=0)
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


def test_gates_figure_one_heatmap_per_gate_with_fixed_ranges_and_counts():
    rng = np.random.default_rng(0)
    gates = {name: np.ma.masked_array(rng.uniform(0, 1, (2, 7, 5))) for name in ("input", "forget", "output")}
    gates["cell"] = np.ma.masked_array(rng.uniform(-1, 1, (2, 7, 5)))
    gates["forget"][1, 3, 2] = np.nan
    gates["input"][1, 5:] = np.ma.masked  # padding of sequence 1
    fig = _checked(figures.gates_figure(gates, 1))
    titles = [a.text for a in fig.layout.annotations]
    assert [t.split(" gate")[0] for t in titles] == ["input", "forget", "output", "cell"]
    assert "NaN 1, Inf 0" in titles[1] and "padding masked" in titles[0] and "NaN" not in titles[0]
    values = [t for t in fig.data if t.name != "NaN/Inf"]
    assert [t.coloraxis for t in values] == ["coloraxis", "coloraxis", "coloraxis", "coloraxis2"]
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0, 1)
    assert (fig.layout.coloraxis2.cmin, fig.layout.coloraxis2.cmax) == (-1, 1)
    # each gate's heatmap is [unit, time] of the chosen sequence, on its own axes
    np.testing.assert_allclose(np.asarray(values[2].z, float), gates["output"][1].T, rtol=1e-6)
    assert len({(t.xaxis, t.yaxis) for t in values}) == 4
    assert _checked(figures.gates_figure({}, 0)).layout.annotations[0].text.startswith(
        "No gates recorded for this layer")


def test_a_failed_read_is_a_message_in_the_page_not_a_traceback(trace_path, monkeypatch):
    src = TraceSource(str(trace_path))
    app = create_app(src)
    client = app.server.test_client()

    def broken(layer, step):
        raise OSError("Input/output error while reading the trace")

    monkeypatch.setattr(src, "step_data", broken)
    deps = client.get("/_dash-dependencies").get_json()
    views = next(d for d in deps if "step-label.children" in d["output"])
    outputs = [{"id": o.split(".")[0], "property": o.split(".")[1]} for o in views["output"].strip(".").split("...")]
    body = {"output": views["output"], "outputs": outputs, "changedPropIds": ["slider.value"], "state": [],
            "inputs": [{"id": "slider", "property": "value", "value": 2},
                       {"id": "layer", "property": "value", "value": "lstm.l0"},
                       {"id": "sequence", "property": "value", "value": 0},
                       {"id": "run", "property": "data", "value": 0}]}
    reply = client.post("/_dash-update-component", json=body)
    assert reply.status_code == 200
    response = reply.get_json()["response"]
    assert response["status"]["children"] == "Input/output error while reading the trace"
    assert response["step-label"]["children"].startswith("step 2")
    assert "Traceback" not in reply.get_data(as_text=True)


def test_gradient_flow_masks_timesteps_no_stored_sequence_reaches(tmp_path):
    """Packed sequences: the batch's longest sequence is not a stored one, so the last timesteps
    are padding in every stored sequence. The gradient-flow heatmap leaves them blank (masked);
    before, they went to the browser as NaN and were drawn and counted as non-finite gradients."""
    import torch
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence

    import seqscope

    torch.manual_seed(0)
    gru = nn.GRU(3, 5)
    lengths = torch.tensor([4, 6, 9])  # sequences 0 and 1 are stored, the longest (9) is not
    with seqscope.watch(gru, tmp_path / "p.h5", every=1, sequences=[0, 1]):
        for _ in range(3):
            out, _ = gru(pack_padded_sequence(torch.randn(9, 3, 3), lengths, enforce_sorted=False))
            out.data.pow(2).sum().backward()
    src = TraceSource(str(tmp_path / "p.h5"))
    steps, norms, mask = src.grad_matrix("gru.l0")
    assert norms.shape == (3, 9)
    assert mask[:, 6:].all() and not mask[:, :6].any()  # no stored sequence reaches timesteps 6-8
    assert np.isfinite(norms[:, :6]).all()
    fig = _checked(figures.gradient_flow_figure(steps, norms, mask, "gru.l0"))
    assert "NaN" not in fig.layout.title.text and "padding masked" in fig.layout.title.text
    assert [t.name for t in fig.data if t.name == "NaN/Inf"] == []
    # a live trace grows: the matrix extended from the first steps' cached one is the same
    src._grad_cache["gru.l0"] = (1, (steps[:1], norms[:1], mask[:1]))
    again = src.grad_matrix("gru.l0")
    np.testing.assert_array_equal(again[2], mask)
    np.testing.assert_array_equal(again[1], norms)
