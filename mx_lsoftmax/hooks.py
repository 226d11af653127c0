"""Six small adaptations of MXNet 1.9.1 that the margin layers need.

All six are installed once, on import, and change nothing for code that does not
meet the margin ops.

1. Schedule state under any initializer. ``mx.sym.Custom(..., op_type='MarginSoftmax')``
   creates the auxiliary state ``{name}_step`` itself, without attributes, and MXNet's
   initializers know only fixed name patterns (BatchNorm registers its own in C++,
   which a CustomOp cannot): any other name raises "Unknown initialization pattern".
   The default case learns one more pattern: a (1,) array named ``*_step`` starts at 0.

2. The op's message in the exception the user catches. MXNet runs a CustomOp's
   callbacks (shape and type inference, forward, backward) behind a C boundary: an
   exception there is printed to stdout and the caller gets an MXNetError that only
   says a callback returned false ("Check failed: reinterpret_cast<CustomOpFBFunc>...").
   The op records its own message (:func:`relay_errors`) and MXNet's error factory
   puts it at the head of that MXNetError, so ``str(error)`` names the input and the
   value in a Module or a hybridized block just as in an imperative call.

3. A clean exit. MXNet's own exit handler (``MXNotifyShutdown``) stops the custom-op
   worker threads and then waits for the engine; a CustomOp callback that is still
   running then, and waits on the engine itself (this op reads labels, norms and the
   target column on the host), makes it abort ("terminate called without an active
   exception") or hang. A script that ends right after ``backward()`` met that every
   time. An exit handler registered after MXNet's, so run before it, waits for all
   pending work first. An error left in that work (an operator that failed where nobody
   read its output) stays unreported at exit, as MXNet alone leaves it.

4. Deferred shapes of a network whose graph leaves a parameter out. A margin block's
   ``step`` (and ``class_margins``) take part in training only, so the prediction graph
   of a hybridized network that holds the block does not read them; Gluon's shape
   inference for deferred parameters then fails on them with a KeyError ("Deferred
   initialization failed because shape cannot be inferred. 'net0_..._step'"), the first
   time such a network predicts before it trains. Where Gluon's own inference raises
   that KeyError, it is run again setting only the parameters the graph reads; the
   others keep the shapes they were declared with.

5. Schedule state in a ``gluon.SymbolBlock``. A SymbolBlock made from a training graph
   (``margin_logits`` on Symbols, ``mx.sym.Custom``) ignores the variables' ``__init__``
   attributes, so ``initialize()`` gave the ``step`` counter the global initializer:
   uniform noise (the schedule started at t = 0.04, not 0), or with ``Xavier`` an error
   (a (1,) array). In a SymbolBlock whose graph holds a margin op, the auxiliary states
   named ``*_step`` start at zero, as in Module and in the margin blocks.

6. The step in a bound graph. A bound executor (``simple_bind``, Module) does not order
   the step's update before the reads pushed after its ``forward``: the Python op writes
   it from MXNet's custom-op thread, and the executor does not count a library op's
   mutated input among the arrays it writes (BatchNorm's moving statistics, a stock
   op's, are ordered). ``Module.get_params()`` right after ``update()`` read the step
   before the op had advanced it (the Python op: every time; the compiled op: as timing
   fell), and ``set_params`` with those values set the schedule back (40 steps counted
   as 23). After a training forward of a graph that holds a margin op, the executor
   waits for its outputs, which exist only once the op, step included, is done;
   backward could not start before then anyway (a Module's executors wait once all
   its devices are running). Gluon's calls order it themselves.
"""
import atexit
import functools
import json
import threading
import warnings

import mxnet as mx
import mxnet.base
from mxnet.gluon import HybridBlock, SymbolBlock
from mxnet.gluon.block import _flatten
from mxnet.module.executor_group import DataParallelExecutorGroup

from .graph import COMPILED_OP

__all__ = ["relay_errors", "install"]

# The callback messages that MXNet 1.9.1 raises when a CustomOp callback fails
# (src/operator/custom/custom.cc): every one names its callback type.
_CALLBACK_FAILURE = "CustomOp"

_pending_lock = threading.Lock()
_pending_message = None


def relay_errors(method):
    """Decorate a CustomOp / CustomOpProp method so its exception message reaches the caller.

    The exception is still raised (MXNet prints it and fails the callback); its text is
    kept until the next MXNetError that reports a failed CustomOp callback takes it.
    Forward and backward run on MXNet's custom-op worker thread, while the error is
    raised on the caller's thread at the next wait, hence one lock-guarded slot.
    """
    @functools.wraps(method)
    def relayed(*args, **kwargs):
        global _pending_message
        try:
            return method(*args, **kwargs)
        except Exception as error:
            with _pending_lock:
                _pending_message = f"{type(error).__name__}: {error}"
            raise
    return relayed


def _take_pending_message():
    global _pending_message
    with _pending_lock:
        message, _pending_message = _pending_message, None
    return message


def _relay_into_mxnet_errors():
    original = mxnet.base.get_last_ffi_error
    if getattr(original, "_margin_softmax_relay", False):
        return

    def get_last_ffi_error():
        error = original()
        text = str(error)
        if _CALLBACK_FAILURE in text:
            message = _take_pending_message()
            if message is not None:
                try:
                    return type(error)(f"{message}\n\n{text}")
                except TypeError:  # an error class with another constructor: keep MXNet's own
                    return error
        return error

    get_last_ffi_error._margin_softmax_relay = True
    # check_call looks the factory up in mxnet.base at every failure, so this one
    # assignment covers every C API call (imperative, executor, CachedOp, waits).
    mxnet.base.get_last_ffi_error = get_last_ffi_error


def _zero_initialise_schedule_steps():
    original = mx.init.Initializer._init_default
    if getattr(original, "_margin_softmax_steps", False):
        return

    def _init_default(self, name, arr):
        if str(name).endswith("_step") and tuple(arr.shape) == (1,):
            arr[:] = 0
            return
        original(self, name, arr)

    _init_default._margin_softmax_steps = True
    mx.init.Initializer._init_default = _init_default


def _wait_for_pending_work():
    try:
        mx.nd.waitall()
    except mx.base.MXNetError:
        # The wait has finished all work before it rethrows an operator's stored error.
        # Left unread until exit, that error is one MXNet's own shutdown would drop
        # silently: printing it here would change the exit of scripts that never touch
        # the margin ops (a float16 Dense on the CPU, say).
        pass


def _finish_pending_work_at_exit():
    if getattr(_finish_pending_work_at_exit, "registered", False):
        return
    # atexit runs its handlers last registered first: MXNet registered its shutdown when
    # it was imported, before this package could be.
    atexit.register(_wait_for_pending_work)
    _finish_pending_work_at_exit.registered = True


def _infer_only_what_the_graph_reads():
    original = HybridBlock._infer_attrs
    if getattr(original, "_margin_softmax_unread", False):
        return

    def _infer_attrs(self, infer_fn, attr, *args):
        try:
            return original(self, infer_fn, attr, *args)
        except KeyError:
            pass
        # Gluon's inference stopped at a parameter its graph does not read: infer the
        # same way and set the attribute of the parameters the graph does read.
        inputs, out = self._get_graph(*args)
        given = [array for array in _flatten(args, "input")[0] if array is not None]
        with warnings.catch_warnings(record=True) as caught:
            argument_attrs, _, auxiliary_attrs = getattr(out, infer_fn)(
                **{variable.name: getattr(array, attr) for variable, array in zip(inputs, given)})
        if argument_attrs is None:
            raise ValueError(caught[0].message if caught else f"{infer_fn} could not complete")
        inferred = dict(zip(out.list_arguments(), argument_attrs))
        inferred.update(zip(out.list_auxiliary_states(), auxiliary_attrs))
        for parameter in self.collect_params().values():
            if parameter.name in inferred:
                setattr(parameter, attr, inferred[parameter.name])

    _infer_attrs._margin_softmax_unread = True
    HybridBlock._infer_attrs = _infer_attrs


# The operators whose auxiliary state is the schedule's step: the Python op's types (registered
# in op.py, which imports this module) and the compiled target op.
_MARGIN_OPS = ({"op": "Custom", "op_type": "MarginSoftmax"}, {"op": "Custom", "op_type": "LSoftmax"},
               {"op": COMPILED_OP})


def _holds_a_margin_op(symbol):
    for node in json.loads(symbol.tojson())["nodes"]:
        described = dict(node.get("attrs", {}), op=node["op"])
        if any(all(described.get(key) == value for key, value in op.items()) for op in _MARGIN_OPS):
            return True
    return False


# Executors whose wait a Module's executor group defers until all its devices are running.
_deferred_waits = threading.local()


def _wait_for_outputs(executors):
    for executor in executors:
        for output in executor.outputs:
            output.wait_to_read()


def _wait_for_the_step_after_a_bound_forward():
    original = mx.executor.Executor.forward
    if getattr(original, "_margin_softmax_steps", False):
        return

    @functools.wraps(original)
    def forward(self, is_train=False, **kwargs):
        outputs = original(self, is_train, **kwargs)
        if is_train:
            holds = getattr(self, "_margin_softmax_op", None)
            if holds is None:
                holds = self._margin_softmax_op = _holds_a_margin_op(self._symbol)
            if holds:
                deferred = getattr(_deferred_waits, "executors", None)
                if deferred is None:
                    _wait_for_outputs([self])
                else:
                    deferred.append(self)
        return outputs

    forward._margin_softmax_steps = True
    mx.executor.Executor.forward = forward

    # A Module runs one executor per device: each waits only once every device's forward is
    # pushed, so that the devices still run at once.
    group_original = DataParallelExecutorGroup.forward

    @functools.wraps(group_original)
    def group_forward(self, data_batch, is_train=None):
        _deferred_waits.executors = []
        try:
            group_original(self, data_batch, is_train)
        finally:
            executors, _deferred_waits.executors = _deferred_waits.executors, None
        _wait_for_outputs(executors)

    DataParallelExecutorGroup.forward = group_forward


def _start_symbol_block_schedules_at_zero():
    original = SymbolBlock.__init__
    if getattr(original, "_margin_softmax_steps", False):
        return

    @functools.wraps(original)
    def __init__(self, outputs, inputs, params=None):
        original(self, outputs, inputs, params)
        symbol = self._cached_graph[1]
        if not _holds_a_margin_op(symbol):
            return
        steps = {name for name in symbol.list_auxiliary_states() if name.endswith("_step")}
        for parameter in self.params.values():
            if parameter.name in steps and parameter.init is None:
                parameter.init = mx.init.Zero()

    __init__._margin_softmax_steps = True
    SymbolBlock.__init__ = __init__


def install():
    """Install the six adaptations (idempotent)."""
    _zero_initialise_schedule_steps()
    _relay_into_mxnet_errors()
    _finish_pending_work_at_exit()
    _infer_only_what_the_graph_reads()
    _start_symbol_block_schedules_at_zero()
    _wait_for_the_step_after_a_bound_forward()
