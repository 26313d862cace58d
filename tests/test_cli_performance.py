"""The generation commands' performance options: parsed into kuas.load and pipeline keyword arguments,
only when given."""

from __future__ import annotations

import argparse

import pytest

from kuas.cli.performance import add_performance_options, load_options, pipeline_options


@pytest.fixture
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kuas txt2img")
    add_performance_options(p)
    return p


def test_nothing_given_leaves_the_defaults_to_the_library(parser):
    args = parser.parse_args([])
    assert load_options(args) == {} and pipeline_options(args) == {}


def test_options_reach_load_and_pipeline(parser):
    args = parser.parse_args(["--tome-ratio", "0.5", "--deepcache-interval", "3", "--lowvram", "--compile",
                              "--threads", "1"])
    assert load_options(args) == {"lowvram": True, "compile": True, "threads": 1}
    assert pipeline_options(args) == {"tome_ratio": 0.5, "deepcache_interval": 3}


def test_wrong_types_fail_in_parsing(parser, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(["--deepcache-interval", "two"])
    assert "deepcache-interval" in capsys.readouterr().err
