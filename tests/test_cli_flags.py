"""Flags whose default is "decide by device": the parser keeps None so the engine decides (EngineConfig)."""
from ringlinear.cli import build_parser


def test_async_scheduling_flag_is_three_way():
    parse = build_parser().parse_args
    assert parse(["serve", "--model", "m"]).async_scheduling is None      # engine default: on for CUDA
    assert parse(["serve", "--model", "m", "--async-scheduling"]).async_scheduling is True
    assert parse(["serve", "--model", "m", "--no-async-scheduling"]).async_scheduling is False
