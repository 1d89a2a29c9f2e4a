import json
import math

import pytest

from mambaquant.cli import main
from mambaquant.compare import compare, format_table, plan, to_markdown, write_json
from mambaquant.errors import InputError
from mambaquant.methods import METHODS
from mambaquant.methods.config import AUTO_METHODS


def test_plan_holds_every_method_with_static_and_dynamic_scales_and_mambaquant_auto():
    runs = [run[:3] for run in plan(METHODS, ("w8a8", "w4a8", "w4a4", "w4a16"), ("tensor", "token", "auto"))]
    quantizing = len(METHODS) - 1
    assert runs[0] == ("fp", "fp32", "none")
    assert len(runs) == len(set(runs)) == 1 + 3 * (2 * quantizing + len(AUTO_METHODS)) + quantizing
    for bits in ("w8a8", "w4a8", "w4a4"):
        for method in METHODS[1:]:
            assert (method, bits, "tensor") in runs and (method, bits, "token") in runs
        assert [r for r in runs if r[1] == bits and r[2] == "auto"] == [("mambaquant", bits, "auto"),
                                                                          ("mambaquant+", bits, "auto")]
    assert {r[2] for r in runs if r[1] == "w4a16"} == {"none"}
    for bad in [(("nope",), ("w8a8",), ("tensor",)), (("rtn",), ("w3a3",), ("tensor",)),
                (("rtn",), ("w8a8",), ("channel",)), (("rtn",), ("w8a8",), ("tensor",), "runtime", ("ssm",))]:
        with pytest.raises(InputError):
            plan(*bad)


def test_plan_runs_each_scope_for_quantized_activations_only():
    runs = plan(("fp", "rtn", "mambaquant"), ("w8a8", "w4a16"), ("tensor", "auto"), scopes="all,linear")
    assert runs == [("fp", "fp32", "none", "all"), ("rtn", "w8a8", "tensor", "all"), ("rtn", "w8a8", "tensor", "linear"),
                    ("mambaquant", "w8a8", "tensor", "all"), ("mambaquant", "w8a8", "auto", "all"),
                    ("mambaquant", "w8a8", "tensor", "linear"), ("mambaquant", "w8a8", "auto", "linear"),
                    ("rtn", "w4a16", "none", "all"), ("mambaquant", "w4a16", "none", "all")]


def test_compare_rows_share_calibration_and_evaluation(small_lm, tmp_path):
    rows = compare(small_lm, methods=("fp", "rtn", "mambaquant"), bits=("w8a8", "w4a16"),
                   granularities=("tensor", "auto"), eval_samples=3, calib_samples=4, calib_len=32)
    assert [(r.method, r.bits, r.granularity) for r in rows] == [
        ("fp", "fp32", "none"), ("rtn", "w8a8", "tensor"), ("mambaquant", "w8a8", "tensor"),
        ("mambaquant", "w8a8", "auto"), ("rtn", "w4a16", "none"), ("mambaquant", "w4a16", "none")]
    fp = rows[0]
    assert fp.value == fp.fp_value and fp.change == 0 and fp.relative_change == 0
    for row in rows:
        assert row.fp_value == fp.value and row.samples == 3 and row.metric == "bits_per_byte"
        assert math.isfinite(row.value) and not row.higher_is_better
        # lower is better: a higher value is a negative relative change
        assert row.relative_change == pytest.approx(-100 * (row.value - fp.value) / fp.value)
    assert any(row.value != fp.value for row in rows[1:])  # quantization did something
    write_json(tmp_path / "rows.json", rows)
    loaded = json.loads((tmp_path / "rows.json").read_text())
    required = {"model", "method", "bits", "granularity", "metric", "value", "fp_value", "higher_is_better"}
    assert len(loaded) == len(rows) and all(required <= set(item) for item in loaded)
    markdown, table = to_markdown(rows, "cmd"), format_table(rows)
    assert markdown.count("\n| ") == len(rows) + 1 and "`cmd`" in markdown
    assert len([line for line in table.splitlines() if line.startswith("  ")]) == len(rows) + 2  # + protocol, header


def test_cli_compare_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "rows.json", tmp_path / "rows.md"
    code = main(["compare", "typeseg", "--methods", "fp,rtn", "--bits", "w8a8", "--granularity", "tensor",
                 "--eval-samples", "2", "--calib-samples", "2", "--json", str(out_json), "--markdown", str(out_md)])
    captured = capsys.readouterr()
    assert code == 0 and "fixed subset of 2" in captured.out and "byte_accuracy" in captured.out
    rows = json.loads(out_json.read_text())
    assert [(r["method"], r["granularity"]) for r in rows] == [("fp", "none"), ("rtn", "tensor")]
    assert rows[1]["agreement"] <= 100 and rows[0]["value"] == rows[0]["fp_value"]
    assert "| rtn | w8a8 | tensor |" in out_md.read_text()


@pytest.mark.parametrize("args, message", [
    (["--methods", "rtn,nope"], "unknown method 'nope'"),
    (["--bits", "w8a4"], "unknown bit widths 'w8a4'"),
    (["--json", "/no/such/dir/rows.json"], "is not an existing directory"),
    (["no-such-model"], "no-such-model"),
])
def test_cli_compare_bad_input(args, message, capsys, tmp_path):
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
