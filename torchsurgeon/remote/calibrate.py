"""How fast this host computes, by dtype and kind of operation, measured once per process.

A request's run time is estimated before it is queued (:func:`~torchsurgeon.remote.limits.
estimate`) as the sum over its tensor operations of ``work / rate``: the rate of the op's
dtype and kind. One fixed rate is wrong by an order of magnitude — on a CPU a bfloat16 or
int64 matrix product runs 5-13x slower than a float32 one — so the rates are measured: a
few milliseconds of 256x256 products and elementwise/reduction kernels per dtype, the first
time a host needs them (:func:`measured_rates`, cached for the process).

Units: a matrix product does ``2 m n k`` operations; every kernel reads and writes
elements (an expanded view counts its logical elements). A dtype missing from the rates
(complex, float8, ...) was not measured, and a request that computes in it is refused.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping

import torch

from torchsurgeon.surgery.errors import SurgeryError

__all__ = [
    "ELEMENTWISE",
    "PRODUCT",
    "Rates",
    "Uncalibrated",
    "measure",
    "measured_rates",
    "op_cost",
]

PRODUCT = "product"
"""Matrix products (and convolutions): the rate is in ``2 m n k`` operations a second."""
ELEMENTWISE = "elementwise"
"""Every other kernel (elementwise, reductions, copies): elements read and written a second."""

Rates = Mapping[tuple[torch.dtype, str], float]
"""``{(dtype, kind): units a second}``."""

DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
"""The dtypes measured (CPU matrix products of ``bool`` do not exist: elementwise only)."""

_PRODUCT_SIZE = 256
"""Square products of this size: 3.4e7 operations, 0.2-30 ms (a per-call stall counts less)."""
_ELEMENTS = 1 << 14
"""Below ATen's parallel grain: one thread, which a busy machine cannot stall (a parallel
kernel there waits for its slowest thread: 1,000x dips were seen on a 2-vCPU VM)."""
_BURST_SECONDS = 2e-4
"""One sample repeats its kernel until it has run this long (the timer's resolution)."""
_SAMPLE_SECONDS = 0.003
"""Samples of one kernel are taken for about this long (at least three)."""

_lock = threading.Lock()
_measured: dict[tuple[torch.dtype, str], float] | None = None


def _timed(kernel: Callable[[], object], units: float) -> float:
    """Units a second of ``kernel()``: the best of short bursts.

    On a shared machine a sustained loop is descheduled now and then (a 2-vCPU VM showed
    100x dips); the best burst is the hardware's speed, and the run-time deadline and the
    safety fraction of the time budget absorb the rest.
    """
    kernel()  # warm-up: first-call allocations and dispatch caches
    repeats, best, samples, spent = 1, 0.0, 0, 0.0
    while samples < 3 or spent < _SAMPLE_SECONDS:
        start = time.perf_counter()
        for _ in range(repeats):
            kernel()
        elapsed = time.perf_counter() - start
        spent += elapsed
        if elapsed < _BURST_SECONDS and repeats < 1 << 12:
            repeats *= 4
            continue
        samples += 1
        best = max(best, repeats * units / max(elapsed, 1e-9))
    return best


def measure(dtypes: tuple[torch.dtype, ...] = DTYPES) -> dict[tuple[torch.dtype, str], float]:
    """The rates of ``dtypes`` on this process's CPU, measured now (a few ms per dtype).

    The elementwise rate is the slower of an ``a * b`` (3 elements a result) and a ``sum``
    (1 a read); a dtype the CPU cannot multiply as matrices has no product rate.
    """
    rates: dict[tuple[torch.dtype, str], float] = {}
    with torch.inference_mode():
        # Start the thread pools first: a fresh process's first BLAS calls ran ~1,000x slower.
        torch.ones(1 << 20).sum()
        warm = torch.ones(128, 128)
        for _ in range(4):
            torch.mm(warm, warm)
        for dtype in dtypes:  # products first, while the pool is awake
            m = _PRODUCT_SIZE
            x = torch.ones(m, m, dtype=dtype)
            try:
                torch.mm(x, x)
            except RuntimeError:  # not implemented for this dtype here (bool)
                continue
            rates[dtype, PRODUCT] = _timed(lambda x=x: torch.mm(x, x), 2.0 * m**3)
        for dtype in dtypes:
            n = _ELEMENTS
            a, b, out = (torch.ones(n, dtype=dtype) for _ in range(3))
            multiply = _timed(lambda a=a, b=b, out=out: torch.mul(a, b, out=out), 3.0 * n)
            reduce = _timed(lambda a=a: a.sum(), n + 1.0)
            rates[dtype, ELEMENTWISE] = min(multiply, reduce)
    return {key: rate for key, rate in rates.items() if math.isfinite(rate) and rate > 0}


def measured_rates() -> dict[tuple[torch.dtype, str], float]:
    """This process's rates: measured on the first call (a host's start-up), then kept."""
    global _measured
    with _lock:
        if _measured is None:
            _measured = measure()
        return dict(_measured)


# --------------------------------------------------------------------------- one op's cost

_PRODUCTS = {
    "mm", "bmm", "addmm", "baddbmm", "matmul", "addbmm", "linear", "dot", "vdot", "mv", "addmv",
}  # fmt: skip
_CONVOLUTIONS = {"convolution", "_convolution", "conv1d", "conv2d", "conv3d"}
_GATHERS = {"embedding", "index_select", "gather", "index", "take"}
"""Kernels that read only as many elements of their first input as they write."""


class Uncalibrated(SurgeryError):
    """An operation computes in a dtype (or kind) this host has no measured rate for (the
    estimate turns it into a ``422 unsupported_dtype`` naming the dtype)."""

    def __init__(self, dtype: torch.dtype, kind: str) -> None:
        super().__init__(f"{dtype} ({kind})")
        self.dtype = dtype
        self.kind = kind


def op_cost(
    func: object,
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor],
    rates: Rates | None,
) -> tuple[float, float]:
    """``(work, seconds)`` of one kernel; ``seconds`` is 0 when ``rates`` is None.

    Work is the elements it reads and writes (an expanded view: its logical elements; a
    view's result: nothing written), plus ``2 m n k`` for a product; the seconds are the
    slower of the product at its product rate and the traffic at its elementwise rate, in
    the slowest dtype it touches. :class:`Uncalibrated` names a dtype ``rates`` lacks.
    """
    schema = getattr(func, "_schema", None)
    name = getattr(schema, "name", "").split("::")[-1]
    returns = schema.returns if schema is not None else []
    if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        return 0.0, 0.0  # a view (expand, transpose, ...): metadata only
    written = 0
    for i, tensor in enumerate(outputs):
        alias = returns[min(i, len(returns) - 1)].alias_info if returns else None
        if alias is None or alias.is_write:
            written += tensor.numel()
    if name in _GATHERS and inputs:
        read = sum(t.numel() for t in inputs[1:]) + written
    else:
        read = sum(t.numel() for t in inputs)
    traffic = float(read + written)
    flops = _flops(name, inputs, outputs)
    if rates is None:
        return traffic + flops, 0.0
    dtypes = {t.dtype for t in (*inputs, *outputs)}
    seconds = traffic / _slowest(rates, dtypes, ELEMENTWISE) if traffic else 0.0
    if flops:
        seconds = max(seconds, flops / _slowest(rates, dtypes, PRODUCT))
    return traffic + flops, seconds


def _flops(name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """``2 m n k`` of a product (its two last operands), ``2 * out * fan-in`` of a conv."""
    matrices = [t for t in inputs if t.dim() >= 1]
    if name in _PRODUCTS and len(matrices) >= 2:
        a, b = matrices[-2], matrices[-1]
        batch = max(a.numel() // max(a.shape[-1], 1), 1)
        columns = b.shape[-1] if b.dim() >= 2 else 1
        return 2.0 * batch * a.shape[-1] * columns
    if name in _CONVOLUTIONS and len(matrices) >= 2 and outputs:
        weight = matrices[1]
        fan_in = weight.numel() // max(weight.shape[0], 1)
        return 2.0 * outputs[0].numel() * fan_in
    return 0.0


def _slowest(rates: Rates, dtypes: set[torch.dtype], kind: str) -> float:
    slowest = math.inf
    for dtype in sorted(dtypes, key=str):
        rate = rates.get((dtype, kind))
        if rate is None:
            raise Uncalibrated(dtype, kind)
        slowest = min(slowest, rate)
    return slowest
