"""What a request may cost, by this host's measured speed: the time estimate, the plan cache's
bytes, and the limits an operator may set (refused when they are nonsense)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from torch import nn

import torchsurgeon as ts
from torchsurgeon.plans import plan
from torchsurgeon.plans.returning import Returning
from torchsurgeon.remote import ApiError, Limits
from torchsurgeon.remote.calibrate import ELEMENTWISE, PRODUCT, measured_rates, op_cost
from torchsurgeon.remote.estimates import estimate
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.limits import TIME_FRACTION
from torchsurgeon.remote.serve import add_serve_parser
from torchsurgeon.remote.server import ServerLimits

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
RATES = {
    **{(d, ELEMENTWISE): 1e10 for d in (*FLOATS, torch.int64, torch.int32, torch.bool)},
    **{(d, PRODUCT): 1e11 for d in (torch.float32, torch.float64)},
    (torch.bfloat16, PRODUCT): 1e9,  # 100x slower, as bf16 products are on some CPUs
    (torch.float16, PRODUCT): 2e9,
    (torch.int64, PRODUCT): 7e8,
}
"""Injected rates (units a second), so the logic is checked apart from this machine's speed."""


class _Lambda(nn.Module):
    def __init__(self, fn: object) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)  # type: ignore[operator]


def _estimate(fn: object, *args: torch.Tensor, rates: object = RATES, **limits: object):
    return estimate(_Lambda(fn), args, {}, Returning(), Limits(**limits), rates=rates)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the estimate


def test_a_reduction_of_a_huge_expanded_view_is_refused_under_the_default_limits() -> None:
    row = torch.ones(1, 1000)  # expanded to 6e11 elements: free in memory, minutes to sum
    with pytest.raises(ApiError) as error:
        _estimate(lambda x: x.expand(600_000_000, 1000).sum(), row)
    assert error.value.status == 422 and error.value.field == "max_run_seconds"
    with pytest.raises(ApiError, match="max_run_seconds"):  # by this host's measured speed too
        _estimate(lambda x: x.expand(600_000_000, 1000).sum(), row, rates=None)
    assert Limits().max_work == math.inf  # no fixed 1e15: the measured time budget decides


def test_work_counts_what_a_kernel_reads_and_writes() -> None:
    small = torch.empty(1, 1000, device="meta")
    big = torch.empty(1000, 1000, device="meta")
    expanded = small.expand(1000, 1000)
    view, _ = op_cost(torch.ops.aten.expand.default, [small], [expanded], RATES)
    assert view == 0  # a view writes nothing
    work, seconds = op_cost(torch.ops.aten.sum.default, [expanded], [torch.empty(())], RATES)
    assert work == 1_000_001  # the expanded view's logical elements, plus the one written
    written, _ = op_cost(torch.ops.aten.repeat.default, [small], [big], RATES)
    assert written == 1000 + 1_000_000  # old estimate: the 1000 read only
    assert seconds == pytest.approx(1_000_001 / 1e10)


def test_each_dtype_is_charged_at_its_own_rate() -> None:
    a = torch.ones(512, 512)  # 2.7e8 operations: 0.0027 s at float32's 1e11/s, 0.27 s at 1e9/s
    limits = {"max_run_seconds": 0.2}  # a budget of 0.1 s
    _estimate(lambda x: x @ x, a, **limits)
    for dtype in (torch.bfloat16, torch.float16, torch.int64):  # 1e9, 2e9, 7e8 a second
        with pytest.raises(
            ApiError, match=r"max_run_seconds=0\.2.*aten\.mm.*torch\.(bfloat16|float16|int64)"
        ) as error:
            _estimate(lambda x: x @ x, a.to(dtype), **limits)
        assert error.value.status == 422 and error.value.field == "max_run_seconds"
    _estimate(lambda x: x @ x, a.bfloat16(), max_run_seconds=0.6)  # 0.27 s of a 0.3 s budget


def test_a_dtype_the_host_did_not_measure_is_refused_by_name() -> None:
    rates = {k: v for k, v in RATES.items() if k[0] is not torch.float16}
    with pytest.raises(ApiError, match=r"torch\.float16") as error:
        _estimate(lambda x: x.half() * 2, torch.ones(4), rates=rates)
    assert error.value.status == 422 and error.value.code == "unsupported_dtype"
    with pytest.raises(ApiError, match=r"torch\.complex64"):  # never measured
        _estimate(lambda x: torch.view_as_complex(x) * 2, torch.ones(4, 2), rates=None)


def test_max_work_is_an_operators_override_of_the_time_budget() -> None:
    a = torch.ones(512, 512).bfloat16()
    with pytest.raises(ApiError) as error:
        _estimate(lambda x: x @ x, a, max_work=1e6)
    assert error.value.field == "max_work"
    # A host whose runs happen elsewhere (a GPU) sets the work itself: no rates are used.
    _estimate(lambda x: x @ x, a, max_work=1e12, max_run_seconds=1e-3, rates={})


def test_the_budget_is_a_fraction_of_max_run_seconds() -> None:
    row = torch.ones(1, 1000)
    summed = lambda rows: lambda x: x.expand(rows, 1000).sum()  # noqa: E731
    _estimate(summed(4_900_000), row, max_run_seconds=1.0)  # 0.49 s at 1e10/s: under 0.5 s
    with pytest.raises(ApiError, match="max_run_seconds"):
        _estimate(summed(6_000_000), row, max_run_seconds=1.0)  # 0.6 s: under 1 s, over half
    assert TIME_FRACTION == 0.5
    # A tiny budget allows 0.05 s: the run-time deadline stops what overruns it.
    _estimate(summed(400_000), row, max_run_seconds=0.0)


def test_calibration_measures_positive_finite_rates_once_per_process() -> None:
    rates = measured_rates()
    for dtype in (*FLOATS, torch.int64, torch.int32, torch.bool):
        assert math.isfinite(rates[dtype, ELEMENTWISE]) and rates[dtype, ELEMENTWISE] > 0
    for dtype in (*FLOATS, torch.int64, torch.int32):
        assert math.isfinite(rates[dtype, PRODUCT]) and rates[dtype, PRODUCT] > 0
    assert measured_rates() == rates  # cached: measured once


# --------------------------------------------------------------------------- the plan cache


def _adapter_plan(model: nn.Module, seed: int, rank: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rank, 64, generator=g), torch.randn(64, rank, generator=g)
    return plan(ts.select(model).at("0").insert_after(ts.layers.LowRankAdapter(a, b))).to_bytes()


def test_the_plan_cache_is_bounded_by_bytes() -> None:
    model = ts.wrap(nn.Sequential(nn.Linear(64, 64)))
    hosted = HostedModel.load("m", model)
    limits = Limits(max_cached_plan_bytes=4 << 20)
    one = 2 * 4096 * 64 * 4  # a rank-4096 adapter: 2 MiB of tensors
    plans = []
    for seed in range(12):  # 24 MiB of distinct plans, each kept with its view
        kept = hosted.read_plan(_adapter_plan(model, seed, 4096), limits)
        hosted.prepare(kept, limits)
        plans.append(kept)
        assert hosted.views.held_bytes <= 4 << 20
    assert hosted.views.held_bytes >= one  # the newest is kept...
    last = _adapter_plan(model, 11, 4096)
    assert hosted.read_plan(last, limits) is plans[-1]  # ...and found again
    assert hosted.read_plan(_adapter_plan(model, 0, 4096), limits) is not plans[0]  # dropped
    huge = _adapter_plan(model, 99, 16384)  # 8 MiB: over the whole budget, never kept
    assert hosted.read_plan(huge, limits) is not hosted.read_plan(huge, limits)
    assert hosted.views.held_bytes <= 4 << 20
    assert Limits().max_cached_plan_bytes == 256 << 20


# --------------------------------------------------------------------------- nonsense limits


def _parse(*options: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="torchsurgeon")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", "--model", "m=/nowhere", *options])


@pytest.mark.parametrize(
    "option",
    [
        ("--max-run-seconds", "nan"),
        ("--max-run-seconds", "inf"),
        ("--max-run-seconds", "-1"),
        ("--max-run-seconds", "0"),
        ("--max-work", "nan"),
        ("--max-work", "inf"),
        ("--max-work", "0"),
        ("--header-timeout", "nan"),
        ("--header-timeout", "-1"),
        ("--max-result-mb", "1e30"),
        ("--max-result-mb", "nan"),
        ("--workers", "0"),
        ("--workers", "-3"),
        ("--workers", "two"),
        ("--shutdown-timeout", "-1"),
        ("--max-connections", "0"),
        ("--batch-window-ms", "-1"),
        ("--replicas", "0"),
        ("--max-running-per-key", "0"),
    ],
)
def test_the_cli_refuses_nonsense_limits_naming_the_option(
    option: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parse(*option)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {option[0]}:" in error and repr(option[1]) in error


def test_the_cli_takes_sane_limits() -> None:
    args = _parse(
        "--max-run-seconds", "30", "--max-work", "1e13", "--header-timeout", "2.5",
        "--max-result-mb", "128", "--workers", "4", "--shutdown-timeout", "0",
    )  # fmt: skip
    assert (args.max_run_seconds, args.max_work, args.workers) == (30.0, 1e13, 4)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_run_seconds", float("nan")),
        ("max_run_seconds", float("inf")),
        ("max_run_seconds", -1.0),
        ("max_work", float("nan")),
        ("max_work", 0.0),
        ("max_result_bytes", 10**30),
        ("max_result_bytes", 0),
        ("max_activation_bytes", 1.5),
        ("max_tensor_ops", -5),
        ("watchdog_grace_seconds", float("nan")),
        ("request_idle_seconds", 0.0),
        ("max_cached_plan_bytes", -1),
        ("max_running_per_key", 0),
        ("batch_window_seconds", float("inf")),
    ],
)
def test_limits_refuse_nonsense_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"Limits\.{field}\b"):
        Limits(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("header_timeout_seconds", float("nan")),
        ("header_timeout_seconds", float("inf")),
        ("shutdown_seconds", -1),
        ("max_connections", 0),
        ("keep_alive_seconds", -1),
        ("backlog", 10**12),
    ],
)
def test_server_limits_refuse_nonsense_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"ServerLimits\.{field}\b"):
        ServerLimits(**{field: value})  # type: ignore[arg-type]


def test_limits_keep_their_defaults_and_round_trip() -> None:
    assert Limits.from_json(Limits().to_json()) == Limits()
    assert Limits(max_run_seconds=0.0).max_run_seconds == 0.0  # every job times out (tests)
    ServerLimits()
