"""stas-compare: converted vs direct-trained runs across timesteps (fast, synthetic JSON)."""
import json
import logging
import re

import pytest

from convert.cli_compare import main
from convert.compare import Run, compare, load_run, plot, to_markdown
from convert.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

REPORT = {
    "model": "vit_tiny_patch16_224", "dataset": "fashion-mnist", "timesteps": 8,
    "ann_top1": 0.788,
    "snn_top1": {"1": 0.40, "2": 0.70, "4": 0.785, "8": 0.79},
    "energy_mj": {"1": 0.05, "2": 0.1, "4": 0.2, "8": 0.4},
    "ann_energy_mj": 0.6, "agreement": {"1": 0.5}, "snn_images_per_s": 50.0,
    "ann_images_per_s": 160.0, "test_images": 2000, "model_path": "runs/convert/model.safetensors",
}
SUMMARY = {
    "model": "spikformer-2-128", "dataset": "fashion-mnist", "timesteps": 4, "top1": 0.88,
    "top1_per_t": {"1": 0.80, "2": 0.85, "3": 0.877, "4": 0.88},
    "energy_per_timestep": [{"t": 0, "macs": 1e5, "sops": 1e7, "energy_mj": 0.01},
                            {"t": 1, "macs": 0, "sops": 2e7, "energy_mj": 0.02},
                            {"t": 2, "macs": 0, "sops": 3e7, "energy_mj": 0.03},
                            {"t": 3, "macs": 0, "sops": 4e7, "energy_mj": 0.04}],
    "energy_mj": 0.10, "images_per_s": 500.0, "checkpoint": "runs/direct/last.safetensors",
    "energy": {"ann_full_mj": 2.0, "per_t": [
        {"t": t, "full_mj": 0.5 * t, "qann_full_mj": 1.0 + 0.1 * t} for t in (1, 2, 3, 4)]},
}
NONE = {"full_energy_mj": None, "qann_full_energy_mj": None}


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.fixture
def files(tmp_path):
    old = {k: v for k, v in SUMMARY.items() if k != "top1_per_t"}
    return {"report": _write(tmp_path / "conv" / "report.json", REPORT),
            "summary": _write(tmp_path / "direct" / "summary.json", SUMMARY),
            "old": _write(tmp_path / "old" / "summary.json", old)}


def test_load_converted(files):
    r = load_run(files["report"])
    assert (r.kind, r.label, r.dataset, r.model) == ("converted", "conv", "fashion-mnist",
                                                     "vit_tiny_patch16_224")
    assert r.timesteps == [1, 2, 4, 8]
    assert r.top1 == [0.40, 0.70, 0.785, 0.79]
    assert r.energy_mj == [0.05, 0.1, 0.2, 0.4]
    assert (r.reference_top1, r.reference_energy_mj, r.images_per_s) == (0.788, 0.6, 50.0)


def test_load_direct_cumulative_energy(files):
    r = load_run(files["summary"], label="D")
    assert (r.kind, r.label) == ("direct", "D")
    assert r.timesteps == [1, 2, 3, 4]
    assert r.top1 == [0.80, 0.85, 0.877, 0.88]
    assert r.energy_mj == pytest.approx([0.01, 0.03, 0.06, 0.10])
    assert r.reference_top1 is None and r.reference_energy_mj is None
    assert r.images_per_s == 500.0


def test_load_direct_untimed_energy_counts_from_step_one(tmp_path):
    s = dict(SUMMARY, energy_per_timestep=[{"t": None, "energy_mj": 0.5}] + SUMMARY[
        "energy_per_timestep"])
    r = load_run(_write(tmp_path / "s.json", s))
    assert r.energy_mj == pytest.approx([0.51, 0.53, 0.56, 0.60])


def test_load_direct_without_top1_per_t(files):
    r = load_run(files["old"])
    assert r.timesteps == [4] and r.top1 == [0.88]
    assert r.energy_mj == pytest.approx([0.10])  # the running sum at T (per-step entries)
    no_steps = {k: v for k, v in SUMMARY.items()
                if k not in ("top1_per_t", "energy_per_timestep")}
    r = load_run(_write(files["old"].parent / "bare.json", no_steps))
    assert (r.timesteps, r.top1, r.energy_mj) == ([4], [0.88], [0.10])


def test_load_run_directory(files):
    assert load_run(files["report"].parent).kind == "converted"


@pytest.mark.parametrize("content, needle", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ({"foo": 1, "bar": [2]}, "snn_top1"),
    ([1, 2], "not an object"),
    (dict(REPORT, snn_top1={"x": 0.5}), "integers >= 1"),
    (dict(REPORT, snn_top1={"1": 75.0}), "fraction in [0, 1]"),
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


@pytest.mark.parametrize("kind, needle", [("missing", "no such file"),
                                          ("not-json", "not valid JSON"),
                                          ("unknown", "snn_top1"),
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
