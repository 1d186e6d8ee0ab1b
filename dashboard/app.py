"""The seqscope dashboard: one global training-step slider drives every view.

Callbacks are thin: validate the browser's input, read from the TraceSource,
call a figure builder from ``figures``.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import numpy as np
from dash import ALL, Dash, Input, Output, State, ctx, dcc, html, no_update

from seqscope.dashboard import figures
from seqscope.dashboard.data import TraceSource
from seqscope.diagnose import no_findings
from seqscope.errors import SeqscopeError

log = logging.getLogger("seqscope")

REPLAY_MS = 800
LIVE_MS = 2000


def _marks(steps: np.ndarray) -> dict[int, str]:
    n = len(steps)
    if n == 0:
        return {}
    idx = np.unique(np.linspace(0, n - 1, min(n, 8)).round().astype(int))
    return {int(i): str(int(steps[i])) for i in idx}


def _graph(id_: str, height: int = 320) -> dcc.Graph:
    return dcc.Graph(id=id_, config={"displaylogo": False}, style={"height": f"{height}px"})


def _marked_graph(id_: str, height: int) -> html.Div:
    """A graph with the current-step marker drawn over it: a line the browser moves
    (``_PLACE_MARKERS``) when the slider moves, so that the figure itself is not
    sent or redrawn (a Plotly shape moved costs the figure's whole redraw, 20-25 ms
    each on results.md's machine)."""
    line = f"2px dotted {figures.MARKER_COLOURS[id_]}"
    return html.Div([_graph(id_, height),
                     html.Div(id=f"{id_}-marker", className="step-marker", style={"borderLeft": line})],
                    style={"position": "relative"})


def _section(title: str, *children: Any) -> html.Div:
    return html.Div([html.H3(title, style={"margin": "12px 0 4px"}), *children], className="section")


def _sequence_count(src: TraceSource) -> int:
    """Sequences stored per step (for the sequence menu): those of the first step."""
    steps, layers = src.steps, src.layers
    if not layers or not len(steps):
        return 1
    try:
        return max(len(src.step_data(layers[0], int(steps[0]))["lengths"]), 1)
    except Exception:  # noqa: BLE001
        return 1


def _sequence_options(n: int) -> list[dict[str, Any]]:
    return [{"label": str(k), "value": k} for k in range(n)]


def create_app(source: TraceSource | str) -> Dash:
    """A Dash app for one trace (a TraceSource, or a path that is opened now)."""
    src = source if isinstance(source, TraceSource) else TraceSource(source)
    app = Dash(__name__, title=f"seqscope — {src.path}")
    # the slider's value is an index into the recorded steps; its marks and the
    # step label show step numbers, so Dash's numeric input box would mislead
    app.index_string = app.index_string.replace(
        "{%css%}", "{%css%}<style>#slider input.dash-range-slider-input {display: none;}"
        " .step-marker {position: absolute; display: none; width: 0; pointer-events: none; z-index: 5;}</style>")
    steps = src.steps
    layers = src.layers
    first_layer = layers[0] if layers else None
    n_seq = _sequence_count(src)

    app.layout = html.Div(
        [
            html.Div(
                [
                    html.H2("seqscope", style={"margin": "0 16px 0 0"}),
                    html.Span(str(src.path), id="trace-path", style={"color": "#666"}),
                ],
                style={"display": "flex", "alignItems": "baseline"},
            ),
            html.Div(
                [
                    html.Label("layer"),
                    dcc.Dropdown(id="layer", options=layers, value=first_layer, clearable=False,
                                 style={"width": "240px"}),
                    html.Label("sequence"),
                    dcc.Dropdown(id="sequence", options=_sequence_options(n_seq),
                                 value=0, clearable=False, style={"width": "90px"}),
                    html.Button("▶ play", id="play", n_clicks=0),
                    html.Span(id="step-label", style={"fontWeight": "bold", "minWidth": "160px"}),
                ],
                style={"display": "flex", "gap": "10px", "alignItems": "center", "margin": "8px 0"},
            ),
            dcc.Slider(id="slider", min=0, max=max(len(steps) - 1, 0), step=1, value=0, marks=_marks(steps),
                       updatemode="drag"),
            dcc.Interval(id="replay", interval=REPLAY_MS, disabled=True),
            dcc.Interval(id="live", interval=LIVE_MS),
            dcc.Store(id="n-steps", data=len(steps)),
            dcc.Store(id="steps", data=[int(s) for s in steps]),
            dcc.Store(id="marker-step"),
            dcc.Store(id="run", data=src.run),
            dcc.Store(id="findings-version", data=-1),
            html.Div(id="status", style={"color": "#b00"}),
            html.Div(
                [
                    html.Div([_section("Overview", _marked_graph("overview", 340)),
                              _section("Gradient flow", _marked_graph("gradflow", 360), _graph("propagation"))],
                             style={"flex": "3", "minWidth": "0"}),
                    html.Div([_section("Findings", html.Div(id="findings", children="diagnosing…"))],
                             style={"flex": "1", "minWidth": "260px", "maxHeight": "1100px", "overflowY": "auto"}),
                ],
                style={"display": "flex", "gap": "16px"},
            ),
            _section("States", html.Div([_graph("hidden"), _graph("cell")],
                                        style={"display": "grid", "gridTemplateColumns": "1fr 1fr"})),
            _section("Gates", dcc.Graph(id="gates", config={"displaylogo": False}),
                     _graph("saturation")),
        ],
        style={"fontFamily": "sans-serif", "margin": "12px 20px"},
    )

    @app.callback(
        Output("slider", "max"), Output("slider", "marks"), Output("n-steps", "data"), Output("steps", "data"),
        Output("run", "data"),
        Output("slider", "value", allow_duplicate=True), Output("layer", "options"),
        Output("layer", "value", allow_duplicate=True), Output("sequence", "options"),
        Output("sequence", "value"),
        Input("live", "n_intervals"), State("n-steps", "data"), State("run", "data"),
        State("layer", "value"), State("layer", "options"),
        prevent_initial_call=True,
    )
    def live_refresh(_: int, known: int, shown_run: int, layer: Any, options: Any) -> Any:
        src.refresh()
        run = src.run
        new_run = run != shown_run
        now = src.steps
        layers = src.layers
        out: list[Any] = [no_update] * 10
        if len(now) != known or new_run:
            out[:4] = max(len(now) - 1, 0), _marks(now), len(now), [int(s) for s in now]
        if layers != options or new_run:
            # layers appear with a live trace's first record, or change with a new run
            out[6] = layers
            if layer not in layers:
                out[7] = layers[0] if layers else None
        if new_run or (known == 0 and len(now)):
            out[8], out[9] = _sequence_options(_sequence_count(src)), 0
        if new_run:  # a new run replaced the trace at the path: show it from its start
            out[4], out[5] = run, 0
        return tuple(out)

    @app.callback(
        Output("overview", "figure"), Output("gradflow", "figure"),
        Input("layer", "value"), Input("n-steps", "data"), Input("run", "data"),
    )
    def layer_views(layer: Any, _: int, __: int) -> Any:
        if not src.layers:  # a live trace before its first record
            empty = figures.to_dict(figures.empty_figure("no recorded steps yet"))
            return empty, empty
        layer = src.check_layer(layer)
        found = src.findings() or []
        # no step marker in the figures: the page draws its own over them (_marked_graph)
        overview = figures.overview_figure(src.series("loss"), src.series("grad_norm"), found)
        s, norms, mask = src.grad_matrix(layer)
        flow = figures.gradient_flow_figure(s, norms, mask, layer) if len(s) else \
            figures.empty_figure("no recorded steps yet")
        return figures.to_dict(overview), figures.to_dict(flow)

    @app.callback(
        Output("findings", "children"), Output("findings-version", "data"),
        Input("live", "n_intervals"), Input("n-steps", "data"), State("findings-version", "data"),
    )
    def findings_list(_: Any, __: Any, shown: int) -> Any:
        found = src.findings()
        if found is None:
            return "diagnosing…", -1
        version = src.findings_version
        if version == shown:
            return no_update, no_update  # re-rendering would reset the buttons under the user's pointer
        if not found:
            text = no_findings(len(src.steps))
            return html.P(text[0].upper() + text[1:], id="no-findings"), version
        items = []
        for i, f in enumerate(found):
            colour = figures.SEVERITY_COLOUR.get(f["severity"], "#888")
            span = (f"step {f['first_step']}" if f["first_step"] == f["last_step"]
                    else f"steps {f['first_step']}–{f['last_step']}")
            items.append(html.Button(
                [html.B(f"{f['severity'].upper()} {f['kind']}", style={"color": colour}),
                 html.Span(f"  {f['layer'] or 'model'}, {span}"), html.Br(),
                 html.Small(f["message"])],
                id={"type": "finding", "index": i}, n_clicks=0, className="finding",
                style={"display": "block", "textAlign": "left", "width": "100%", "margin": "4px 0",
                       "border": f"1px solid {colour}", "background": "white", "cursor": "pointer"},
            ))
        return items, version

    @app.callback(
        Output("slider", "value", allow_duplicate=True), Output("layer", "value"),
        Input({"type": "finding", "index": ALL}, "n_clicks"),
        prevent_initial_call=True,
    )
    def go_to_finding(clicks: list[int]) -> Any:
        if not ctx.triggered_id or not any(clicks or []):
            return no_update, no_update
        found = src.findings() or []
        i = ctx.triggered_id["index"]
        if not isinstance(i, int) or not 0 <= i < len(found):
            return no_update, no_update
        f = found[i]
        steps = src.steps
        index = int(np.searchsorted(steps, f["first_step"]))
        index = min(index, len(steps) - 1)
        layer = f["layer"] if f["layer"] in src.layers else no_update
        return index, layer

    @app.callback(
        Output("step-label", "children"), Output("propagation", "figure"), Output("hidden", "figure"),
        Output("cell", "figure"), Output("gates", "figure"), Output("saturation", "figure"),
        Output("status", "children"),
        Input("slider", "value"), Input("layer", "value"), Input("sequence", "value"), Input("run", "data"),
    )
    def step_views(index: Any, layer: Any, sequence: Any, _: int) -> Any:
        steps = src.steps
        if not len(steps):
            empty = figures.to_dict(figures.empty_figure("no recorded steps yet"))
            return "no steps", empty, empty, empty, empty, empty, ""
        layer = src.check_layer(layer)
        index = int(index) if isinstance(index, (int, float)) else 0
        index = min(max(index, 0), len(steps) - 1)
        step = int(steps[index])
        try:
            data = src.step_data(layer, step)
        except Exception as exc:  # noqa: BLE001 - shown in the page, not a traceback
            empty = figures.to_dict(figures.empty_figure(str(exc)))
            return f"step {step}", empty, empty, empty, empty, empty, str(exc)
        hidden = data["hidden"]
        k = int(sequence) if isinstance(sequence, (int, float)) and 0 <= int(sequence) < hidden.shape[0] else 0
        label = f"step {step}  ({index + 1} of {len(steps)})"

        def state_fig(arr: np.ma.MaskedArray, title: str) -> Any:
            z = np.ma.filled(arr[k].astype(np.float64), np.nan).T  # [unit, time]
            return figures.heatmap(z, mask=np.ma.getmaskarray(arr[k]).T, title=title, x_title="timestep",
                                   y_title="unit", zmid=0.0)

        hidden_fig = state_fig(hidden, f"h_t, {layer}, sequence {k}")
        cell_fig = state_fig(data["cell"], f"c_t, {layer}, sequence {k}") if "cell" in data else \
            figures.empty_figure("no cell state (not an LSTM layer)")
        prop = data.get("propagation")
        prop_fig = figures.propagation_figure(prop, k, layer, step) if prop is not None else \
            figures.empty_figure("no gradients at this step (no backward pass)")
        gates_fig = figures.gates_figure(data["gates"], k)
        sat_fig = figures.saturation_figure(data["gates"]) if data["gates"] else figures.empty_figure("no gates")
        views = [figures.to_dict(f) for f in (prop_fig, hidden_fig, cell_fig, gates_fig, sat_fig)]
        return (label, *views, "")

    @app.callback(
        Output("replay", "disabled"), Output("play", "children"),
        Input("play", "n_clicks"), State("replay", "disabled"),
        prevent_initial_call=True,
    )
    def toggle_play(_: int, disabled: bool) -> Any:
        playing = bool(disabled)  # it was paused: start
        return (not playing), ("⏸ pause" if playing else "▶ play")

    # the current-step markers over the overview and the gradient flow: placed from the
    # slider's step, and again after every redraw of their figure (a layer change, a
    # zoom, a resize)
    app.clientside_callback(
        _PLACE_MARKERS,
        Output("marker-step", "data"),
        Input("slider", "value"), Input("steps", "data"), Input("overview", "figure"), Input("gradflow", "figure"),
    )

    app.clientside_callback(
        """
        function(n, value, max) {
            if (value === null || value === undefined) { return 0; }
            return value >= max ? 0 : value + 1;
        }
        """,
        Output("slider", "value"),
        Input("replay", "n_intervals"), State("slider", "value"), State("slider", "max"),
        prevent_initial_call=True,
    )
    return app


# Puts each marker (a div over its graph, _marked_graph) on the current step's
# x: the graph's plot area from Plotly's own layout (its x axis maps a step to
# pixels), hidden where the step is outside the axis's range (zoomed) or the
# figure has no data. Retries while the graph is still being drawn (10 s); after that,
# Plotly's "plotly_afterplot" event places it again after every redraw.
_PLACE_MARKERS = """
function(index, steps, overview, gradflow) {
    const m = window.seqscopeMarkers = window.seqscopeMarkers || {
        step: null,
        waiting: {},
        place: function (id, tries) {
            const box = document.getElementById(id + '-marker');
            const graph = document.getElementById(id);
            const gd = graph && graph.querySelector('.js-plotly-plot');
            if (!box) { return; }
            const fl = gd && gd._fullLayout;
            if (!fl || !fl.xaxis || !fl._size || typeof gd.on !== 'function') {
                box.style.display = 'none';
                tries = tries || 0;
                if (!m.waiting[id] && tries < 100) {  // for 10 s; a new figure calls this again
                    m.waiting[id] = true;
                    setTimeout(function () { m.waiting[id] = false; m.place(id, tries + 1); }, 100);
                }
                return;
            }
            if (!gd.seqscopeMarker) {
                gd.seqscopeMarker = true;
                gd.on('plotly_afterplot', function () { m.place(id); });
            }
            const xa = fl.xaxis, step = m.step;
            const lo = Math.min(xa.range[0], xa.range[1]), hi = Math.max(xa.range[0], xa.range[1]);
            if (step === null || !(gd.data && gd.data.length) || !(step >= lo && step <= hi)) {
                box.style.display = 'none';
                return;
            }
            const outer = box.parentElement.getBoundingClientRect(), plot = gd.getBoundingClientRect();
            box.style.left = (plot.left - outer.left + xa._offset + xa.l2p(step) - 1) + 'px';
            box.style.top = (plot.top - outer.top + fl._size.t) + 'px';
            box.style.height = fl._size.h + 'px';
            box.style.display = 'block';
        }
    };
    const n = (steps || []).length;
    m.step = n ? steps[Math.min(Math.max(Math.round(index || 0), 0), n - 1)] : null;
    m.place('overview');
    m.place('gradflow');
    return m.step;
}
"""


def _check_port(host: str, port: int) -> None:
    """Fail with one line, before anything is printed, when the address is taken
    (another dashboard, often); the web server would print its own error after our
    banner had announced the address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise SeqscopeError(f"cannot serve on {host}: {exc}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise SeqscopeError(
                f"cannot serve on {host}:{port}: {exc.strerror or exc} (another dashboard? one open on this "
                f"trace's path shows new runs written there by itself); choose another port with --port {port + 1}"
            ) from None


def serve(path: str, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Serve the dashboard for ``path`` until interrupted."""
    source = TraceSource(path)
    app = create_app(source)
    _check_port(host, port)
    print(f"seqscope dashboard for {path}: http://{host}:{port}/  (Ctrl+C to stop)", flush=True)
    app.run(host=host, port=port, debug=False)
