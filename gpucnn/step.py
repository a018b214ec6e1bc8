"""The training step runner: :func:`train_step` (``Sequential.train_step``) runs the layers' forward and
backward in fused stages, ends every buffer's life when nothing reads it again, and captures and replays the
step as a CUDA graph.

Stages. When a Sequential is built it decides what to fuse (:func:`plan`, ``fuse=True``) by asking the layers:
each says what it would add as an epilogue value (``Layer.epilogue()``: an activation, a pooling) and a head says
which it computes in its own kernels (``Layer.absorbs``): a Conv2D or Dense computes the activation after it in
its bias kernel, and a Conv2D the pooling after that too; the stage then owns what those layers would have kept
(:class:`Stage`; called alone, every layer still computes its own op). Every parameter lives in one flat array and
every gradient in another (:class:`gpucnn.optim.FlatParameters`); backward writes each gradient straight into
its view. A step on the GPU path (LeNet-5: 29 launches) is then: per conv im2col, GEMM, and bias + activation
+ pooling in one kernel that also writes NCHW; per dense a GEMM and bias + activation; softmax cross-entropy
with its gradient and the batch mean in one launch; backward per layer one kernel for the activation's (and
pooling's) backward fused with the bias gradient, the weight-gradient GEMM, and the input-gradient GEMM (and
col2im) except for the first layer, which needs no input gradient; then ONE optimizer kernel over the flat
buffers. The CPU runs the same plan with the NumPy twins: bias and activation in place on the GEMM's output,
pooling in the GEMM's layout (only the pooled result is transposed), float32 throughout.

Lifetimes. Everything the step allocates comes from a workspace arena kept per batch shape
(:class:`gpucnn.memory.Arena`), laid out after the first run so that buffers never alive together share memory;
from its second run a step allocates nothing. A buffer's life ends here, in one place (:class:`_Lifetimes`):
what a stage's forward made and neither returned nor declared (``Layer.save_for_backward``) ends when it
returns; a stage's output when the next stage's forward has read it, unless declared; what a layer declared,
and the gradient it was given, once its backward has run (so that backward may write over it: Conv2D puts its
input gradient's lowering in its lowered input's memory); what a backward made and did not return, when it
returns; an array sharing memory with one still read (a view), when that one ends. Layers release nothing. A
kernel function releases only temporaries it allocated itself, next to their last read, so that a later request
of the same function may have their memory (the rule chosen over a scope object: it reads in place and keeps the
kernels' code as it was). Recompute is this runner's policy
(:data:`RECOMPUTE_ABOVE`): a lowered input larger than that is not kept but made again in backward. In poison
mode (``GPUCNN_POISON=1``, :func:`gpucnn.memory.poison`) every array is filled with NaN at its end of life.

Graphs. On "cuda" the whole step is captured once per batch shape as a CUDA graph (after one eager warm-up)
and replayed: the batch is copied into the graph's input buffers, and what changes per step (learning rate,
Adam's step count, dropout keys) is written by the host into small device arrays the kernels read, before each
replay. "sim" captures the same way and refuses what a capture on a GPU refuses (host reads, syncs,
allocations outside the workspace, and GEMMs through cupy.matmul, which CuPy does not let a graph capture:
without nvmath-python every capture falls back to eager steps, with one warning per model; see gpucnn.blas).
"""
from __future__ import annotations

import contextlib
import warnings

from . import backend, memory
from .checkpoint import as_json
from .layers.base import Act, Pool
from .optim import clip_grad_norm

__all__ = ["train_step", "plan", "Stage", "RECOMPUTE_ABOVE"]

# Bytes: the recompute policy. In a training step on the GPU path, a conv's lowered input (im2col's matrix;
# Winograd's V) is kept for backward's weight gradient only when it is at most this large; a larger one ends
# at once and backward lowers the input again (one more launch, a pass over memory). Kept, every layer's matrix
# is alive at the step's peak (2.1 GiB of AlexNet's 3.3 at batch 128, bench/memory.py); dropped, the workspace
# holds one at a time. LeNet-5's (20 MiB at batch 256) stay. 0: always recompute; None: never.
# (Conv2D.RECOMPUTE_ABOVE reads and sets this.)
RECOMPUTE_ABOVE = 64 * 2 ** 20
DEFAULT_RECOMPUTE_ABOVE = RECOMPUTE_ABOVE

OOM_ADVICE = ("Train with a smaller batch, or lower Conv2D.RECOMPUTE_ABOVE (= gpucnn.step.RECOMPUTE_ABOVE, bytes; "
              "layers whose im2col matrix is larger make it again in backward instead of keeping it for the whole "
              "step); bench/memory.py shows a step's peak memory by batch size.")

# ------------------------------------------------------------------------------------------ stages

class Stage:
    """One or more consecutive layers run as one: a head (Conv2D, Dense) and the layers after it whose epilogues
    (Layer.epilogue: an activation, a pooling) its kernels compute (Layer.absorbs); or a single layer. The stage
    owns what the fused layers would have kept: ``switches``, a fused max pooling's argmax."""

    def __init__(self, head, fused=()):
        self.head, self.layers = head, [head, *fused]
        # what the head's forward is passed to compute the fused layers, by the kind of each epilogue
        self.fused = {_KEYWORD[type(e)]: e for e in (layer.epilogue() for layer in fused)}

    @property
    def switches(self):
        """Max pooling's argmax where this stage computed one (a deconvnet reads them), else None."""
        pool = self.fused.get("pool")
        return self.head.switches if pool is not None and pool.kind == "max" else None

    def forward(self, x, training):
        return self.head.forward(x, training=training, **self.fused)


_KEYWORD = {Act: "activation", Pool: "pool"}


def plan(layers, fuse: bool = True) -> list:
    """The fusion plan: ``layers`` grouped into the stages forward and backward run (see the module docstring). Each
    head takes the layers after it for as long as it absorbs their epilogues; the layers are asked, never typed."""
    stages, L, i = [], list(layers), 0
    while i < len(L):
        head, fused, epilogues = L[i], [], []
        for layer in L[i + 1:] if fuse else ():
            e = layer.epilogue()
            if e is None or not head.absorbs(*epilogues, e):
                break
            fused.append(layer)
            epilogues.append(e)
        stages.append(Stage(head, fused))
        i += 1 + len(fused)
    return stages


# ------------------------------------------------------------------------------------------ one step

def train_step(model, x, y, loss, optimizer, clip_norm=None, graph=None):
    """One training step on the batch ``x`` (in the model's dtype, standardised: see ``Sequential.prepare``)
    with integer labels ``y``: forward, ``loss``, backward, clipping to ``clip_norm`` (if given) and
    ``optimizer``'s update. Returns the loss as a 0-d array on the device, without a host copy or a
    sync; it lives in the step's workspace, so it is valid until the next step of the same shape.

    The step runs in a workspace arena kept for its batch shape (no allocation from its second run).
    On "cuda", with ``graph`` (default: the model's ``graph``, True), the second run of a batch shape
    captures the step as a CUDA graph and later runs replay it; "sim" captures it the same way, under the
    same rules (backend.capture_graph). A capture that fails warns once per model, and that batch shape
    runs eagerly. The logits stay readable as ``model.last_output`` until the next step. Running out of
    device memory is a :class:`gpucnn.backend.DeviceMemoryError` that says what to do.

    (The layers are called from this function itself, not through helpers: a kernel launch is at most six
    gpucnn frames below it, tests/test_step.py.)
    """
    with memory.device_memory_errors(lambda: model._step_name("train_step", x), OOM_ADVICE):
        st = _step_cache(model, x, y, loss, optimizer, clip_norm)
        if _graph_ready(model, st, x, y, loss, optimizer, clip_norm, graph):
            return _replay(model, st, x, y, loss, optimizer)
        stages = model.stages
        backend.bind(model, *_persistent(model, optimizer))    # launches wrap their views once (gpucnn.launch.bind)
        with memory.workspace(st.arena, recompute_above=RECOMPUTE_ABOVE):
            life = _Lifetimes(model, stages, x, y, optimizer)
            h = x
            for k, stage in enumerate(stages):
                mark, stage.head.saved = memory.mark(), None
                out = stage.head.forward(h, training=True, **stage.fused)
                life.forwarded(k, mark, h, out)
                h = out
            model._last_output = h
            value = loss.forward(h, y)
            life.keep(h, value)
            gy = loss.backward()
            with _backward_mode(stages, life.first):
                for k in range(len(stages) - 1, life.first - 1, -1):
                    mark = memory.mark()
                    gx = stages[k].head.backward(gy)
                    life.backwarded(k, mark, gy, gx)
                    gy = gx
            if clip_norm is not None:
                clip_grad_norm(model, clip_norm)
            optimizer.step()
        st.runs += 1
        return value


@contextlib.contextmanager
def _backward_mode(stages, first):
    """Within this block (a step's backward) each stage's head may write over what its forward declared
    (``retain_saved = False``: it ends with its backward), and the first stage with parameters skips its input
    gradient (``needs_input_grad = False``, on a Conv2D or Dense): nothing upstream wants it."""
    changed = [(st.head, "retain_saved", False) for st in stages[first:]]
    if first < len(stages) and hasattr(stages[first].head, "needs_input_grad"):
        changed.append((stages[first].head, "needs_input_grad", False))
    before = [(layer, name, layer.__dict__.get(name, _UNSET)) for layer, name, _ in changed]
    for layer, name, value in changed:
        setattr(layer, name, value)
    try:
        yield
    finally:
        for layer, name, value in reversed(before):
            if value is _UNSET:
                delattr(layer, name)
            else:
                setattr(layer, name, value)


_UNSET = object()


class _Lifetimes:
    """Who still reads each array of one training step, and the end of its life (memory.release) once nobody
    does: the rules of the module docstring. An array that nobody reads but that shares memory with one still
    read (Flatten's output is its input; a gradient passed on as a view) waits for that one. Never ended: the
    batch, the labels, the logits, the loss, and the model's and optimizer's own arrays.

    Active where an end of life does something: the GPU path (the workspace reuses the memory) and poison mode
    (the array is filled with NaN: on "cpu", where nothing is reused, that is what checks the declarations)."""

    def __init__(self, model, stages, x, y, optimizer):
        self.on = backend.on_gpu(x) or memory.poisoning()
        self.stages = stages
        self.first = next((k for k, st in enumerate(stages) if any(l.params for l in st.layers)), len(stages))
        self.saved = [[] for _ in stages]   # per stage, (array, span) its backward reads
        self.made = [None] * len(stages)    # per undeclared stage, the requests of its forward, ended after backward
        self.dead = []                      # (array, span) nobody reads, waiting for no live array to share memory
        self.flow = []                      # the stage output or gradient the next stage reads, as (array, span)
        self.fixed = []
        self._spans = {}                    # id -> (array, span): each array's bytes found once per step
        if self.on:
            flat = model.flat
            self.grads = flat.grad          # (layers' gradients are views of it: no workspace buffer is)
            arrays = [x, y, flat.param, flat.grad, *getattr(optimizer, "flat_state", {}).values()]
            arrays += [a for layer in model.layers for a in layer.buffers.values()]    # (params: views of flat)
            self.keep(*arrays)

    def keep(self, *arrays):
        """Arrays whose lives this step never ends (the batch, the logits, the loss, persistent arrays)."""
        if self.on:
            self.fixed += self._pairs(arrays)

    def forwarded(self, k, mark, x, out):
        """After stage k's forward (x -> out): what it made for nobody ends; x was read for the last time."""
        if not self.on:
            return
        declared = self.stages[k].head.saved
        self.flow = self._pairs([out])
        if declared is None:                # undeclared: its input, output and all it made wait for its backward
            self.made[k] = (mark, memory.mark())
            declared = self._pairs([x, out])
        else:
            declared = self._pairs(declared)
            memory.release_since(mark, spans=[s for _, s in (*self.flow, *declared)])
        ended = self._pairs([x]) if k > 0 else []       # (the batch is never ended)
        if k >= self.first:
            self.saved[k] = declared
        else:                               # stages before the first with parameters run no backward
            ended += declared
        self._end(ended)

    def backwarded(self, k, mark, gy, gx):
        """After stage k's backward (gy -> gx): what it made and did not return ends, and so do gy and what the
        stage declared (and, undeclared, all its forward made)."""
        if not self.on:
            return
        self.flow = self._pairs([gx])
        grads = [g for layer in self.stages[k].layers for g in layer.grads.values()
                 if g is not None and g.base is not self.grads]
        memory.release_since(mark, grads, spans=[s for _, s in self.flow])
        ended = self.saved[k]
        self.saved[k] = []
        if self.made[k] is not None:
            start, stop = self.made[k]
            self.made[k] = None
            memory.release_since(start, stop=stop, spans=[s for _, s in self._live()])
        self._end(self._pairs([gy]) + ended)

    def _live(self):
        """(array, span) of everything still read: what the next stage reads, what backward reads, and the fixed."""
        return [*self.flow, *(p for saved in self.saved for p in saved), *self.fixed]

    def _end(self, pairs):
        """Add ``pairs`` to the dead and end the life of every dead one that shares no memory with a live one."""
        self.dead += pairs
        if not self.dead:
            return
        live = [s for _, s in self._live()]
        waiting = []
        for a, span in self.dead:
            if memory.overlap([span], live):
                waiting.append((a, span))
            else:
                memory.release(a)
        self.dead = waiting

    def _pairs(self, arrays) -> list:
        """(array, the bytes it covers) of each array that has any."""
        out = []
        for a in arrays:
            if a is not None and getattr(a, "size", 0):
                p = self._spans.get(id(a))
                if p is None:       # (the pair holds the array: its id names no other while the step runs)
                    p = self._spans[id(a)] = (a, memory._span(a))
                out.append(p)
        return out


# ------------------------------------------------------------------------------------------ the step cache

class _StepCache:
    """What train_step keeps per batch shape: the workspace arena, and on "cuda" and "sim" the captured graph with
    its input buffers, its outputs and a fingerprint of the arrays it was captured with."""

    def __init__(self):
        self.arena = backend.Arena()
        self.runs = 0
        self.graph = None           # what backend.capture_graph made, or False once capturing failed
        self.x = self.y = self.value = self.output = self.fingerprint = None


def _step_cache(model, x, y, loss, optimizer, clip_norm) -> _StepCache:
    """The checks of a step's arguments, and the _StepCache of its batch shape (made at its first run)."""
    if getattr(optimizer, "model", model) is not model:
        raise ValueError("Sequential.train_step: the optimizer was made for another model; "
                         "create it with this one, e.g. gc.optim.SGD(model, lr=...)")
    model.flat              # packed (again, if a parameter array was replaced) before the cache is looked up
    # a loss is known by its type and configuration, not its identity: a loop that passes a new
    # SoftmaxCrossEntropy() every step keeps its cached steps (their workspace, their graph)
    owner = ((type(loss), as_json(loss.config()) if hasattr(loss, "config") else id(loss)), optimizer, clip_norm)
    old = model._steps_owner
    if old is None or old[0] != owner[0] or old[1] is not optimizer or old[2] != clip_norm:
        model._steps, model._steps_owner = {}, owner      # another loss or optimizer: other steps
    # the GEMMs' precision is part of a captured graph, so each precision has its own
    key = (tuple(x.shape), x.dtype.str, backend.is_cupy(x), tuple(y.shape), y.dtype.str, backend.precision())
    st = model._steps.get(key)
    if st is None:
        st = model._steps[key] = _StepCache()
    return st


# ------------------------------------------------------------------------------------------ graphs

def _graph_ready(model, st, x, y, loss, optimizer, clip_norm, graph) -> bool:
    """Whether this step replays a captured graph: on the GPU path with ``graph`` (default: the model's), from the
    second run of a batch shape on (the first capture happens here), unless capturing that shape failed."""
    use_graph = (model.graph if graph is None else bool(graph)) and backend.on_gpu(x)
    if not use_graph or st.graph is False:
        return False
    fingerprint = _fingerprint(model, optimizer)
    if st.graph is not None and st.fingerprint != fingerprint:
        # the optimizer state, the parameters or a layer's algorithm changed: two eager runs (the workspace drops
        # its plan, then plans the new path), then capture again
        st.graph, st.runs = None, -1
    if st.graph is None and st.runs >= 1:
        _capture(model, st, x, y, loss, optimizer, clip_norm, fingerprint)
    return bool(st.graph)


def _persistent(model, optimizer) -> list:
    """Every persistent array a step reads or writes besides its workspace (None for what is not there yet)."""
    flat = model.flat
    arrays = [flat.param, flat.grad, *getattr(optimizer, "flat_state", {}).values(),
              getattr(optimizer, "_hyper_buf", None)]
    arrays += [getattr(layer, "_keys", None) for layer in model.layers]
    return arrays + [a for layer in model.layers for a in layer.buffers.values()]


def _fingerprint(model, optimizer):
    """The identity of every persistent array a captured step reads or writes besides its workspace, and the
    layers' algorithms (and fusion) its kernels were captured for."""
    return (tuple(id(a) for a in _persistent(model, optimizer))
            + (model.fuse, *(getattr(layer, "algorithm", None) for layer in model.layers)))


def _host_counters(model, loss, optimizer):
    """The integers the step's Python advances (layer counters, the loss's and optimizer's step counts)."""
    objs = [*model.layers, loss, optimizer]
    return [(o, {k: v for k, v in vars(o).items() if isinstance(v, int) and not isinstance(v, bool)})
            for o in objs]


def _capture(model, st, x, y, loss, optimizer, clip_norm, fingerprint):
    """Capture the step as a graph (nothing runs while capturing; see backend.capture_graph): the eager step,
    run under capture; the host counters advanced by the captured Python are put back, and _replay then runs the
    graph for this batch. A failed capture warns once per model (what it costs); this batch shape then runs
    eagerly."""
    with backend.no_workspace():
        st.x, st.y = x.copy(), y.copy()        # the graph's input buffers, for good
    counters = _host_counters(model, loss, optimizer)

    def step(x, y):
        value = train_step(model, x, y, loss, optimizer, clip_norm, graph=False)
        return value, model._last_output

    graph, outputs, error = backend.capture_graph(step, st.x, st.y)
    for obj, ints in counters:
        for k, v in ints.items():
            setattr(obj, k, v)
    if error is not None:
        st.graph = False
        if not model._graph_warned:
            model._graph_warned = True
            warnings.warn(f"Sequential.train_step: capturing the step as a CUDA graph failed "
                          f"({type(error).__name__}: {error}); this model's steps run eagerly, without a graph: "
                          f"one host launch per kernel, 29 per LeNet-5 step at tens of microseconds each. Other "
                          f"batch shapes that fail to capture fall back silently. See the GPU-speed issue, point 1",
                          stacklevel=4)
        return
    st.graph, st.fingerprint = graph, fingerprint
    st.value, st.output = outputs


def _replay(model, st, x, y, loss, optimizer):
    """Run the captured step on this batch: copy it into the graph's inputs, do the host's half of the
    step (each layer's replay_step, the loss's count, the optimizer's scalars), launch the graph."""
    st.x[...] = x
    st.y[...] = y
    for layer in model.layers:
        layer.replay_step()
    if isinstance(getattr(loss, "step", None), int):
        loss.step += 1
    optimizer.begin_step()
    st.graph.launch()
    model._last_output = st.output
    return st.value
