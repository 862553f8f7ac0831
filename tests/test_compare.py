"""stas-compare: converted vs direct-trained runs across timesteps (fast, synthetic JSON)."""
import json
import logging
import re

import pytest

from convert.cli_compare import main
from convert.compare import Run, compare, load_run, plot, to_markdown
from convert.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

def _rows(top1, energy, full=None, qann=None, ts=None):
    ts = ts or range(1, len(top1) + 1)
    rows = []
    for i, t in enumerate(ts):
        row = {"t": t, "top1": top1[i], "energy_mj": energy[i],
               "full_energy_mj": None if full is None else full[i]}
        if qann is not None:
            row["qann_full_energy_mj"] = qann[i]
        rows.append(row)
    return rows


REPORT = {  # stas-convert's report.json (schema stas-run/1), trimmed to what compare reads
    "schema": "stas-run/1", "kind": "converted",
    "model": "vit_tiny_patch16_224", "dataset": "fashion-mnist", "timesteps": 8,
    "top1": 0.79, "energy_mj": 0.4,
    "per_t": _rows([0.40, 0.70, 0.785, 0.79], [0.05, 0.1, 0.2, 0.4], ts=[1, 2, 4, 8]),
    "reference": {"kind": "ann", "top1": 0.788, "energy_mj": 0.6, "images_per_s": 160.0},
    "images_per_s": 50.0, "test_images": 2000, "model_path": "runs/convert/model.safetensors",
}
SUMMARY = {  # stas-train's summary.json
    "schema": "stas-run/1", "kind": "direct",
    "model": "spikformer-2-128", "dataset": "fashion-mnist", "timesteps": 4, "top1": 0.88,
    "energy_mj": 0.10, "full_energy_mj": 2.0,
    "per_t": _rows([0.80, 0.85, 0.877, 0.88], [0.01, 0.03, 0.06, 0.10],
                   full=[0.5, 1.0, 1.5, 2.0], qann=[1.1, 1.2, 1.3, 1.4]),
    "reference": None, "images_per_s": 500.0, "checkpoint": "runs/direct/last.safetensors",
}
NONE = {"full_energy_mj": None, "qann_full_energy_mj": None}


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.fixture
def files(tmp_path):
    one = dict(SUMMARY, per_t=SUMMARY["per_t"][-1:])  # a summary known at T only
    return {"report": _write(tmp_path / "conv" / "report.json", REPORT),
            "summary": _write(tmp_path / "direct" / "summary.json", SUMMARY),
            "old": _write(tmp_path / "old" / "summary.json", one)}


def test_load_converted(files):
    r = load_run(files["report"])
    assert (r.kind, r.label, r.dataset, r.model) == ("converted", "conv", "fashion-mnist",
                                                     "vit_tiny_patch16_224")
    assert r.timesteps == [1, 2, 4, 8]
    assert r.top1 == [0.40, 0.70, 0.785, 0.79]
    assert r.energy_mj == [0.05, 0.1, 0.2, 0.4]
    assert (r.reference_top1, r.reference_energy_mj, r.images_per_s) == (0.788, 0.6, 50.0)
    assert r.reference_images_per_s == 160.0


def test_load_direct_reads_the_same_rows(files):
    r = load_run(files["summary"], label="D")
    assert (r.kind, r.label) == ("direct", "D")
    assert r.timesteps == [1, 2, 3, 4]
    assert r.top1 == [0.80, 0.85, 0.877, 0.88]
    assert r.energy_mj == pytest.approx([0.01, 0.03, 0.06, 0.10])
    assert r.full_energy_mj == [0.5, 1.0, 1.5, 2.0]
    assert r.reference_top1 is None and r.reference_energy_mj is None
    assert r.images_per_s == 500.0
    r = load_run(files["old"])
    assert (r.timesteps, r.top1, r.energy_mj) == ([4], [0.88], [0.10])


def test_rows_in_any_order_are_sorted_by_t(tmp_path):
    s = dict(SUMMARY, per_t=list(reversed(SUMMARY["per_t"])))
    assert load_run(_write(tmp_path / "s.json", s)).timesteps == [1, 2, 3, 4]


def test_load_run_directory(files):
    assert load_run(files["report"].parent).kind == "converted"


@pytest.mark.parametrize("content, needle", [
    (None, "file not found"),
    ("{not json", "not valid JSON"),
    ({"foo": 1, "bar": [2]}, "not a stas-run/1 run report: no schema (fields: bar, foo)"),
    (dict(REPORT, schema="stas-run/0"), "schema 'stas-run/0'"),
    ([1, 2], "expected a JSON object"),
    (dict(REPORT, per_t=[]), "per_t must be a non-empty list"),
    (dict(REPORT, per_t=[{"t": "x", "top1": 0.5}]), "t an integer >= 1"),
    (dict(REPORT, per_t=[{"t": 1, "top1": 0.5}, {"t": 1, "top1": 0.6}]), "each t once"),
    (dict(REPORT, per_t=[{"t": 1, "top1": 75.0}]), "fraction in [0, 1]"),
])
def test_load_run_errors(tmp_path, content, needle):
    path = tmp_path / "in.json"
    if content is not None:
        _write(path, content)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_run(path)


def test_compare_table(files):
    table = compare([load_run(files["report"]), load_run(files["summary"])])
    assert table["dataset"] == "fashion-mnist"
    conv, direct = table["runs"]
    assert [p["t"] for p in conv["points"]] == [1, 2, 4, 8]
    assert conv["points"][1] == {"t": 2, "top1": 0.70, "energy_mj": 0.1, **NONE}
    assert conv["best"]["top1"] == 0.79 and conv["best"]["t"] == 8
    assert conv["final"]["t"] == 8
    # 0.785 is within 0.5 points of 0.79; 0.70 is not
    assert conv["within_tolerance"] == {"t": 4, "top1": 0.785, "energy_mj": 0.2, **NONE}
    assert conv["reference"]["top1"] == 0.788 and conv["reference"]["energy_mj"] == 0.6
    assert direct["within_tolerance"]["t"] == 3
    assert direct["within_tolerance"]["energy_mj"] == pytest.approx(0.06)
    assert direct["reference"] is None
    # the full ledger per t, and the equal-information QANN, where the summary has them
    assert direct["points"][2]["full_energy_mj"] == 1.5
    assert direct["points"][2]["qann_full_energy_mj"] == pytest.approx(1.3)
    json.dumps(table, allow_nan=False)  # JSON-able


def test_compare_best_not_final_and_dataset_warning(tmp_path):
    a = Run("a", "direct", "cifar10", "m", [1, 2, 3], [0.5, 0.9, 0.8], [1.0, 2.0, None])
    b = Run("b", "direct", "fashion-mnist", "m", [4], [0.7], [0.3])
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("convert.compare")
    log.addHandler(handler)
    try:
        table = compare([a, b])
    finally:
        log.removeHandler(handler)
    assert any("different datasets" in r.getMessage() for r in records)
    assert table["dataset"] is None and table["datasets"] == ["cifar10", "fashion-mnist"]
    ra = table["runs"][0]
    assert ra["best"] == {"t": 2, "top1": 0.9, "energy_mj": 2.0, **NONE}
    assert ra["within_tolerance"]["t"] == 2  # 0.9 >= final 0.8 - 0.005
    assert ra["final"]["energy_mj"] is None
    with pytest.raises(ConfigError, match="unique"):
        compare([a, a])
    with pytest.raises(ConfigError, match="no runs"):
        compare([])


def test_markdown(files):
    md = to_markdown(compare([load_run(files["report"]), load_run(files["summary"])]))
    assert md.splitlines()[0] == ("| run | t | top-1 % | energy mJ/image (conventional) | "
                                  "full ledger mJ | equal-information QANN, full mJ |")
    assert "| conv | 2 | 70.00 | 0.1 | n/a | n/a |" in md
    assert "| conv | ANN | 78.80 | 0.6 | n/a | |" in md
    assert "| direct | 3 | 87.70 | 0.06 | 1.5 | 1.3 |" in md
    assert "ANN" not in "".join(line for line in md.splitlines() if line.startswith("| direct"))


def test_plot_png(files, tmp_path):
    runs = [load_run(files["report"]), load_run(files["old"])]
    out = plot(runs, tmp_path / "p" / "x.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]  # no temp file left


def test_cli_writes_three_files(files, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main([str(files["report"]), str(files["summary"]), str(files["old"]),
               "--labels", "A,B,C", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md",
                                                     "compare.png"]
    table = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in table["runs"]] == ["A", "B", "C"]
    png = (out / "compare.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 0
    stdout = capsys.readouterr().out
    assert "| A | ANN | 78.80 | 0.6 | n/a | |" in stdout
    assert stdout == (out / "compare.md").read_text()


def _bad_input(tmp_path, kind):
    if kind == "missing":
        return [str(tmp_path / "nope.json")]
    if kind == "not-json":
        return [str(_write(tmp_path / "bad.json", "hello, world"))]
    if kind == "unknown":
        return [str(_write(tmp_path / "other.json", {"epochs": 3, "loss": 0.1}))]
    if kind == "labels":
        return [str(_write(tmp_path / "r.json", REPORT)), "--labels", "a,b"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, needle", [("missing", "file not found"),
                                          ("not-json", "not valid JSON"),
                                          ("unknown", "not a stas-run/1 run report"),
                                          ("labels", "--labels")])
def test_cli_user_errors(tmp_path, capsys, kind, needle):
    out = tmp_path / "out"
    rc = main(_bad_input(tmp_path, kind) + ["--out", str(out)])
    assert rc == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("stas-compare: error: ") and needle in err
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()  # nothing written
