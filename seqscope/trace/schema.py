"""The seqscope trace format: every dataset, field, dtype and axis in one place.

A trace is one HDF5 file. Recorded arrays of every shape live in a few flat,
extendable "heaps" (one per storage dtype); a table (``index``) says where each
array starts and what shape it has. This keeps the set of datasets fixed from
the moment the file is created, which HDF5's single-writer/multiple-reader
(SWMR) mode requires, so a trace can be read while training still writes it.

Layout (version 1)::

    /                 attrs: format="seqscope-trace", version, created, config (JSON)
    /layers           [layer]   LAYER_DTYPE: one row per recorded layer (and direction)
    /scalar_names     [name]    bytes: names of logged scalars, id = row number
    /steps            [record]  STEP_DTYPE: one row per recorded training step or evaluation pass
    /scalars          [row]     SCALAR_DTYPE: (step, name id, value), long format
    /index            [array]   INDEX_DTYPE: one row per recorded array
    /heap_f16 .. /heap_i64      flat data, see HEAPS
    /commit           int64[COMMIT_SIZE]: how many rows of each table are complete

Durability: the writer appends data, flushes, then writes ``/commit`` and
flushes again. Readers only look at rows below the committed counts, so a file
whose writer was killed mid-append reads as the state of the last commit.

Array axes (all arrays are stored row-major in this order):

- ``hidden``      [sequence, time, unit]   h_t of the layer (projected size with proj_size)
- ``cell``        [sequence, time, unit]   c_t (LSTM only)
- ``gates``       [sequence, time, gate, unit]  activated gates, order in GATE_NAMES
- ``grad_hidden`` [sequence, time]   ||dL/dh_t||_2, total BPTT derivative
- ``grad_cell``   [sequence, time]   ||dL/dc_t||_2 (LSTM only)
- ``propagation`` [sequence, time]   ||(dh_T/dh_t)^T v||, v the unit gradient at the
  sequence's last processed timestep (see capture.recurrences)
- ``lengths``     [sequence]  valid timesteps of each stored sequence
- ``sequence_index`` [sequence]  index of each stored sequence in the batch

Time always follows the input's order, also for reverse-direction layers.
"""

from __future__ import annotations

import numpy as np

FORMAT_NAME = "seqscope-trace"
SCHEMA_VERSION = 1

# ---- layer table -------------------------------------------------------------
LAYER_DTYPE = np.dtype(
    [
        ("name", "S200"),  # e.g. b"rnn.l0_reverse"
        ("module", "S200"),  # qualified module name in the watched model
        ("kind", "S16"),  # one of KINDS
        ("layer", "i4"),  # layer index inside the module
        ("direction", "i1"),  # 0 forward, 1 reverse
        ("input_size", "i4"),
        ("hidden_size", "i4"),  # size of c_t and of the gates
        ("output_size", "i4"),  # size of h_t (proj_size when set)
        ("gates", "S256"),  # comma-separated gate names of a user-written cell (else empty)
    ]
)

KIND_LSTM = "lstm"
KIND_GRU = "gru"
KIND_RNN_TANH = "rnn_tanh"
KIND_RNN_RELU = "rnn_relu"
KIND_CUSTOM = "custom"  # a user-written cell named in watch(cells=...)
KINDS = (KIND_LSTM, KIND_GRU, KIND_RNN_TANH, KIND_RNN_RELU, KIND_CUSTOM)

GATE_NAMES: dict[str, tuple[str, ...]] = {
    KIND_LSTM: ("input", "forget", "cell", "output"),
    KIND_GRU: ("reset", "update", "new"),
    KIND_RNN_TANH: (),
    KIND_RNN_RELU: (),
    KIND_CUSTOM: (),  # per layer: LAYER_DTYPE["gates"]
}

# ---- step table --------------------------------------------------------------
STEP_DTYPE = np.dtype(
    [
        ("step", "i8"),
        ("wall_time", "f8"),  # seconds since the epoch when the step's forward began
        ("batch_size", "i4"),
        ("n_time", "i4"),  # padded length of the longest sequence
        ("n_sequences", "i4"),  # sequences stored per layer
        ("phase", "i1"),  # PHASE_TRAIN or PHASE_EVAL
    ]
)

# A record is a training step (forward + backward, gradients recorded) or an
# evaluation pass (a forward under torch.no_grad(), numbered with the training
# step in progress, no gradients); both can exist for one step number.
PHASE_TRAIN = 0
PHASE_EVAL = 1
PHASES = {"train": PHASE_TRAIN, "eval": PHASE_EVAL}

SCALAR_DTYPE = np.dtype([("step", "i8"), ("name", "i4"), ("value", "f8")])
SCALAR_NAME_DTYPE = np.dtype("S256")

# Names of the scalars seqscope itself logs.
SCALAR_LOSS = "loss"
SCALAR_GRAD_NORM = "grad_norm"  # global L2 norm of all parameter gradients
SCALAR_PARAM_GRAD_PREFIX = "grad_norm/"  # + parameter name
SCALAR_SIGMA_PREFIX = "sigma_max/"  # + layer name: largest singular value of W_hh
SCALAR_NONFINITE_PREFIX = "nonfinite/"  # + layer name: NaN/Inf count in the layer's stored arrays
# with watch(grad_scaler=...): the loss scale of the step's backward (recorded
# gradients are divided by it), and 1.0 where no optimizer step followed (a
# GradScaler skips steps whose scaled gradients overflowed)
SCALAR_GRAD_SCALE = "amp/grad_scale"
SCALAR_OPTIMIZER_SKIPPED = "amp/optimizer_step_skipped"

# ---- array index -------------------------------------------------------------
INDEX_DTYPE = np.dtype(
    [
        ("step", "i8"),
        ("layer", "i4"),  # row in /layers
        ("field", "i2"),  # FIELDS id
        ("heap", "i1"),  # HEAPS id
        ("offset", "i8"),  # first element in the heap
        ("shape", "i4", (4,)),  # unused trailing axes are 1
        ("ndim", "i1"),
        ("phase", "i1"),  # PHASE_TRAIN or PHASE_EVAL
    ]
)

FIELD_HIDDEN = "hidden"
FIELD_CELL = "cell"
FIELD_GATES = "gates"
FIELD_GRAD_HIDDEN = "grad_hidden"
FIELD_GRAD_CELL = "grad_cell"
FIELD_PROPAGATION = "propagation"
FIELD_LENGTHS = "lengths"
FIELD_SEQUENCE_INDEX = "sequence_index"
FIELDS = (
    FIELD_HIDDEN,
    FIELD_CELL,
    FIELD_GATES,
    FIELD_GRAD_HIDDEN,
    FIELD_GRAD_CELL,
    FIELD_PROPAGATION,
    FIELD_LENGTHS,
    FIELD_SEQUENCE_INDEX,
)
FIELD_ID = {name: i for i, name in enumerate(FIELDS)}

# Bulk fields may be stored at reduced precision; norms never are (they span
# 1e-40..1e+40, beyond float32's range), and integer fields are exact.
BULK_FIELDS = frozenset({FIELD_HIDDEN, FIELD_CELL, FIELD_GATES})

HEAPS = ("heap_f16", "heap_f32", "heap_f64", "heap_i64")
HEAP_DTYPES = (np.float16, np.float32, np.float64, np.int64)
HEAP_ID = {np.dtype(dt): i for i, dt in enumerate(HEAP_DTYPES)}
HEAP_CHUNK = 1 << 16  # elements per chunk

# ---- commit counters ---------------------------------------------------------
COMMIT_LAYERS = 0
COMMIT_SCALAR_NAMES = 1
COMMIT_STEPS = 2
COMMIT_SCALARS = 3
COMMIT_INDEX = 4
COMMIT_CLOSED = 5  # 1 once the writer closed the file cleanly
COMMIT_SIZE = 8

TABLES = {
    "layers": (LAYER_DTYPE, COMMIT_LAYERS),
    "scalar_names": (SCALAR_NAME_DTYPE, COMMIT_SCALAR_NAMES),
    "steps": (STEP_DTYPE, COMMIT_STEPS),
    "scalars": (SCALAR_DTYPE, COMMIT_SCALARS),
    "index": (INDEX_DTYPE, COMMIT_INDEX),
}
TABLE_CHUNK = 1024

# Storage precision of bulk fields (the ``precision=`` option of watch()).
PRECISIONS = ("auto", "float16", "float32", "full")
