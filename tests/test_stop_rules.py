"""Stop rules (p.haul's) and migrate-test argument validation: pure logic, no lab."""

import pytest

from labkit.errors import UserError
from labkit.experiment.config import apply_cell, build_config, parse_matrix, parse_size
from labkit.experiment.rules import StopRules


@pytest.mark.parametrize("pages, expect", [
    ([], None),
    ([65536], None),                         # round 0 alone never stops (unless max-rounds 1)
    ([65536, 5000], None),
    ([65536, 5000, 3000], None),
    ([65536, 5000, 64], "min-pages"),        # <= 64 pages
    ([65536, 64], "min-pages"),
    ([65536, 5000, 5501], "growth"),         # +10.02% > 10%
    ([65536, 5000, 5500], None),             # exactly +10% is still fine
    ([65536, 900, 800, 700, 600, 500, 400, 300], "max-rounds"),
    ([65536, 900, 800, 700, 600, 500, 400], None),
])
def test_phaul_defaults(pages, expect):
    assert StopRules().decide(pages) == expect


def test_configurable_rules():
    r = StopRules(max_rounds=3, min_pages=0, max_growth=50)
    assert r.decide([100, 10]) is None
    assert r.decide([100, 10, 14]) == "max-rounds"
    assert StopRules(max_rounds=1).decide([100]) == "max-rounds"
    assert StopRules(max_growth=50).decide([1000, 100, 160]) == "growth"
    assert StopRules(min_pages=0).decide([100, 0]) == "min-pages"


def test_small_rounds_win_over_max_rounds():
    assert StopRules(max_rounds=2).decide([100, 10]) == "min-pages"


@pytest.mark.parametrize("text, value", [("64M", 64 << 20), ("1G", 1 << 30), ("8K", 8192),
                                         ("256MiB", 256 << 20), ("12288", 12288)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("kw, needle", [
    ({"size": "12Q"}, "--size '12Q'"),
    ({"size": "4K"}, "at least 8K"),
    ({"size": "9000"}, "4 KiB pages"),
    ({"rate": "-1"}, "--rate -1"),
    ({"rate": "fast"}, "--rate 'fast'"),
    ({"dst": "node1"}, "both 'node1'"),
    ({"tracker": "magic"}, "--tracker 'magic'"),
    ({"pattern": "zigzag"}, "--pattern 'zigzag'"),
    ({"max_rounds": "0"}, "--max-rounds"),
    ({"min_pages": "-3"}, "--min-pages"),
    ({"max_growth": "-1"}, "--max-growth"),
    ({"hot_fraction": "0"}, "--hot-fraction"),
    ({"verify_resume": "-2"}, "--verify-resume"),
    ({"corrupt": "bits:3"}, "corrupt hook"),
])
def test_bad_arguments_are_one_line_user_errors(kw, needle):
    args = {"src": "node1", "dst": "node2", **kw}
    with pytest.raises(UserError) as e:
        build_config(**args)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)
    assert e.value.exit_code == 2


def test_matrix_grid():
    cells = parse_matrix("size=64M,256M rate=1000,20000 pattern=uniform,hotset")
    assert len(cells) == 8
    assert cells[0] == {"size": "64M", "rate": "1000", "pattern": "uniform"}
    base = build_config(src="node1", dst="node2")
    cfg = apply_cell(base, cells[-1])
    assert (cfg.size, cfg.rate, cfg.pattern) == (256 << 20, 20000.0, "hotset")
    assert cfg.label == "size=256M-rate=20000-pattern=hotset"
    for bad in ("", "size", "colour=red", "size=1M rate=1 size=2M"):
        with pytest.raises(UserError):
            parse_matrix(bad)
    with pytest.raises(UserError, match="--matrix size"):
        apply_cell(base, {"size": "2Q"})
