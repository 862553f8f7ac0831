"""stas-tune: search space, Pareto export, --config round trip, bad input, SQLite resume after
a kill, two workers on one PostgreSQL study, a direct-path study."""
import dataclasses
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from stas_core.checkpoint import save_checkpoint
from stas_core.cli.config import apply_config_file
from stas_core.errors import ConfigError
from tuning import export
from tuning.cli import main as tune_main
from tuning.space import DEFAULTS, build_space, parse_range
from tuning.storage import open_storage
from tuning.study import PENALTY, TuneConfig, run_study

from helpers import FMNIST_MISSING, have_fmnist, missing, needs_fmnist

import optuna


ROOT = Path(__file__).resolve().parents[1]
# subprocesses: one torch thread (a busy 2-core machine stalls with more), unbuffered output
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TINY_CONVERTED = ["--path", "converted", "--val-subset", "64", "--batch-size", "64",
                  "--energy-images", "32", "--heartbeat-interval", "1", "--grace-period", "2"]


def _tune(*args):
    return subprocess.Popen([sys.executable, "-m", "tuning.cli", *map(str, args)], env=ENV,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _fake_checkpoint(path, fmt):
    save_checkpoint(path, {"format": fmt, "config": {"model": "spikformer-1-32"}})
    return path


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def converted_model(tmp_path_factory):
    """A tiny converted ViT (2 blocks, T=2), as stas-convert saves it."""
    from convert.pipeline import ConvertConfig, convert
    from convert.timm_models import parse_model_kwargs

    if not have_fmnist():
        missing(FMNIST_MISSING)
    out = tmp_path_factory.mktemp("converted")
    report = convert(ConvertConfig(
        model="vit_tiny", model_kwargs=parse_model_kwargs("patch_size=7,depth=2,embed_dim=48,num_heads=3"),
        random_init=True,
        timesteps=2, calib_images=16, train_subset=16, val_subset=16, batch_size=16,
        energy_images=8, out=str(out), progress=False))
    return Path(report["model_path"])


def _pg_bindir():
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(Path(d) / "initdb", os.X_OK) and os.access(Path(d) / "pg_ctl", os.X_OK):
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on loopback (trust auth), stopped at teardown."""
    bindir = _pg_bindir()
    if bindir is None:
        missing("PostgreSQL server binaries (initdb, pg_ctl) not found under "
                    "/usr/lib/postgresql/*/bin; install them: apt-get install -y postgresql")
    try:
        import psycopg2
    except ImportError:
        missing("psycopg2 missing: pip install -e '.[test]' (psycopg2-binary)")
    root = Path(tempfile.mkdtemp(prefix="stas-pg-"))
    prefix = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            missing("running as root and no 'postgres' system user to run PostgreSQL as "
                        "(apt-get install -y postgresql creates it)")
        os.chown(root, pg.pw_uid, pg.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def pg(*cmd):
        return subprocess.run([*prefix, *map(str, cmd)], capture_output=True, text=True,
                              timeout=120, cwd=root)

    r = pg(bindir / "initdb", "-D", data, "--auth=trust", "-U", "stas", "--no-locale",
           "-E", "UTF8", "--no-sync")
    assert r.returncode == 0, r.stderr
    r = pg(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60", "-o",
           f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -F", "start")
    assert r.returncode == 0, r.stderr + (root / "server.log").read_text()
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="stas", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE tune")
        conn.close()
        yield f"postgresql://stas@127.0.0.1:{port}/tune"
    finally:
        pg(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ library pieces
def test_search_space_defaults_ranges_and_errors(tmp_path):
    space = build_space("direct")
    assert space.names == ("alpha", "beta", "eps", "delta_p") and space.knobs[3].log
    assert build_space("converted").names == ("alpha", "beta", "eps")
    knob = parse_range("delta-p=1e-5:1e-3:linear")
    assert (knob.name, knob.low, knob.high, knob.log) == ("delta_p", 1e-5, 1e-3, False)
    assert parse_range("delta_p=1e-6:1e-3").log  # delta_p is log-scale by default
    spec = tmp_path / "space.json"
    spec.write_text(json.dumps({"alpha": [-1, 1], "eps": "0:0.2", "delta_p": [1e-4, 1e-2, "log"]}))
    space = build_space("direct", ["alpha=-2:2"], str(spec))
    assert {k.name: (k.low, k.high) for k in space.knobs} == {
        "alpha": (-2, 2), "beta": (DEFAULTS["beta"].low, DEFAULTS["beta"].high),
        "eps": (0, 0.2), "delta_p": (1e-4, 1e-2)}  # --range wins over the file
    for bad, words in [("eps=0.3:0.1", "empty search range for eps"),
                       ("alpha=1:1", "empty search range for alpha"),
                       ("gamma=0:1", "unknown knob 'gamma'"),
                       ("eps=0:1.5", "outside [0, 1)"),
                       ("delta_p=0:1e-3:log", "low > 0"),
                       ("alpha", "expected NAME=LOW:HIGH")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            parse_range(bad)
    with pytest.raises(ConfigError, match="delta_p cannot be tuned on --path converted"):
        build_space("converted", ["delta_p=1e-5:1e-3"])
    spec.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_space("direct", space_file=str(spec))


def test_pareto_front_and_best_choice():
    def rec(n, top1, energy, state="COMPLETE"):
        return {"number": n, "state": state, "params": {"alpha": n}, "top1": top1,
                "objective_energy_mj": energy, "token_ratio": 0.5, "values": [top1, energy]}

    records = [rec(0, 0.80, 1.0), rec(1, 0.85, 2.0), rec(2, 0.79, 1.5),  # 2 is dominated by 0
               rec(3, 0.855, 3.0), rec(4, 0.7, 0.5), rec(5, 0.99, 0.1, state="FAIL")]
    front = export.pareto_front(records)
    assert [r["number"] for r in front] == [4, 0, 1, 3]
    # no floor: cheapest point within 0.01 of the best top-1 (0.855)
    assert export.choose_best(records, "pareto")["number"] == 1
    assert export.choose_best(records, "pareto", min_top1=0.75)["number"] == 0
    assert export.choose_best(records, "pareto", min_top1=0.95)["number"] == 3  # none reaches
    assert export.choose_best([], "pareto") is None


def test_config_file_sets_defaults_and_flags_win(tmp_path, capsys):
    from convert.cli import build_parser as convert_parser
    from convert.cli import main as convert_main
    from stas_core.cli.train import build_parser as train_parser
    from stas_core.cli.train import main as train_main

    cfg = tmp_path / "best.json"
    cfg.write_text(json.dumps({"halting": True, "alpha": 1.5, "beta": -1, "eps": 0.05,
                               "delta-p": 1e-4, "timesteps": 3, "no_progress": True}))
    argv = ["--direct", "--config", str(cfg), "--beta", "-3"]
    p = train_parser()
    apply_config_file(p, argv)
    args = p.parse_args(argv)
    assert (args.halting, args.alpha, args.beta, args.eps, args.delta_p, args.timesteps,
            args.progress) == (True, 1.5, -3.0, 0.05, 1e-4, 3, False)
    p = convert_parser()
    cfg.write_text(json.dumps({"halting": True, "alpha": 2, "halting_score": "current"}))
    apply_config_file(p, ["vit_tiny", "--config", str(cfg)])
    args = p.parse_args(["vit_tiny", "--config", str(cfg)])
    assert (args.halting, args.alpha, args.halting_score) == (True, 2.0, "current")
    for text, words in [({"gamma": 1}, "unknown option 'gamma'"),
                        ({"alpha": "x"}, "bad value 'x' for 'alpha'"),
                        ({"halting_score": "median"}, "must be one of mean, current"),
                        ([1, 2], "expected a JSON object")]:
        cfg.write_text(json.dumps(text))
        code = convert_main(["vit_tiny", "--config", str(cfg), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
        assert words in err, err
    code = train_main(["--direct", "--config", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err
    assert code == 2 and "file not found" in err and err.count("\n") == 1, err


def test_run_study_energy_objective_with_pruning_and_exports(tmp_path):
    """Single objective: energy + penalty below the top-1 floor; a pruner sees per-epoch
    values; exactly n finished trials; best.json is the cheapest trial above the floor."""
    ckpt = _fake_checkpoint(tmp_path / "s1.safetensors", "stas-direct/1")
    seen = []

    def fake(params, number, on_epoch):
        top1 = 0.9 - params["eps"]       # eps > 0.1 misses the 0.8 floor
        energy = 1.0 - params["eps"]     # ... but saves energy
        for epoch in range(3):
            if on_epoch is not None:
                on_epoch(epoch, {"epoch": epoch + 1, "val_top1": top1})
        seen.append(number)
        return {"top1": top1, "energy_mj": energy, "token_ratio": 0.5}

    cfg = TuneConfig(path="direct", checkpoint=str(ckpt), out=str(tmp_path / "t"), n_trials=8,
                     objective="energy", min_top1=0.8, trial_epochs=3, seed=1,
                     ranges=("eps=0:0.2",))
    summary = run_study(cfg, evaluate=fake)
    study = optuna.load_study(study_name="stas-tune", storage=cfg.storage_url)
    states = [t.state.name for t in study.trials]
    assert len(states) == 8 and set(states) <= {"COMPLETE", "PRUNED"}, states
    assert "PRUNED" in states  # trials far below the floor stop after their first epoch
    for t in study.trials:
        if t.state.name == "COMPLETE":
            top1, energy = t.user_attrs["top1"], t.user_attrs["energy_mj"]
            want = energy + (PENALTY * (1 + 0.8 - top1) if top1 < 0.8 else 0.0)
            assert t.value == pytest.approx(want)
    best = json.loads((tmp_path / "t" / "best.json").read_text())
    assert set(best) == {"halting", "eps", "alpha", "beta", "delta_p"} and best["halting"]
    feasible = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs["top1"] >= 0.8]
    assert feasible and best["eps"] == max(t.params["eps"] for t in feasible)
    assert summary["best"]["params"] == {k: best[k] for k in ("alpha", "beta", "eps", "delta_p")}
    lines = (tmp_path / "t" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(x)["state"] in ("COMPLETE", "PRUNED") for x in lines)
    # a second run with a larger total runs only the missing trials
    seen.clear()
    cfg.n_trials = 10
    run_study(cfg, evaluate=fake)
    assert len(seen) <= 2 and len(optuna.load_study(study_name="stas-tune",
                                                    storage=cfg.storage_url).trials) == 10
    # the same study with another objective is refused
    cfg.objective, cfg.min_top1 = "pareto", None
    with pytest.raises(Exception, match="created with --objective energy"):
        run_study(cfg, evaluate=fake)


def test_trial_left_running_by_a_dead_worker_does_not_block(tmp_path):
    """A worker killed between creating a trial and its first heartbeat leaves a RUNNING
    trial that no heartbeat can mark stale: the next worker fails and re-queues it."""
    ckpt = _fake_checkpoint(tmp_path / "m.safetensors", "stas-converted/1")
    cfg = TuneConfig(path="converted", checkpoint=str(ckpt), out=str(tmp_path / "t"),
                     n_trials=2, heartbeat_interval=1, grace_period=2)
    (tmp_path / "t").mkdir()
    study = optuna.create_study(storage=cfg.storage_url, study_name="stas-tune",
                                directions=["maximize", "minimize"])
    study.ask()  # RUNNING, never evaluated, no heartbeat
    summary = run_study(cfg, evaluate=lambda p, n, e: {"top1": 0.5, "energy_mj": p["eps"] + 1,
                                                      "token_ratio": 1.0})
    states = [t.state.name for t in optuna.load_study(study_name="stas-tune",
                                                      storage=cfg.storage_url).trials]
    assert states.count("COMPLETE") == 2 and states.count("FAIL") == 1, states
    assert summary["complete_trials"] == 2 and summary["trials_run_here"] == 2


# ------------------------------------------------------------------ CLI: bad input
@pytest.mark.parametrize("case", ["storage", "direct-as-converted", "converted-as-direct",
                                  "empty-range", "unknown-knob"])
def test_cli_bad_input_one_clear_error(tmp_path, capsys, case):
    direct = _fake_checkpoint(tmp_path / "last.safetensors", "stas-direct/1")
    conv = _fake_checkpoint(tmp_path / "model.safetensors", "stas-converted/1")
    args, words = {
        "storage": (["--path", "converted", "--checkpoint", conv, "--storage",
                     "postgresql://nobody:hunter2@127.0.0.1:1/x"],
                    ["postgresql://nobody:***@127.0.0.1:1/x", "cannot open study storage",
                     "server runs"]),
        "direct-as-converted": (["--path", "converted", "--checkpoint", direct],
                                ["direct-training checkpoint", "use --path direct"]),
        "converted-as-direct": (["--path", "direct", "--checkpoint", conv],
                                ["converted model", "use --path converted"]),
        "empty-range": (["--path", "converted", "--checkpoint", conv, "--range", "eps=0.3:0.1"],
                        ["empty search range for eps"]),
        "unknown-knob": (["--path", "converted", "--checkpoint", conv, "--range", "gamma=0:1"],
                         ["unknown knob 'gamma'", "alpha, beta, eps, delta_p"]),
    }[case]
    code = tune_main([*map(str, args), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("stas-tune: error: "), err
    for w in words:
        assert w in err, err
    assert "hunter2" not in err
    assert not (tmp_path / "o" / "pareto.json").exists()


def test_path_is_detected_from_the_checkpoint(tmp_path, capsys):
    from tuning.study import TuneConfig

    direct = _fake_checkpoint(tmp_path / "last.safetensors", "stas-direct/1")
    conv = _fake_checkpoint(tmp_path / "model.safetensors", "stas-converted/1")
    other = _fake_checkpoint(tmp_path / "other.safetensors", "something/1")
    assert TuneConfig(checkpoint=str(direct)).validate().path == "direct"
    assert TuneConfig(checkpoint=str(conv)).validate().path == "converted"
    code = tune_main(["--checkpoint", str(other), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "format 'something/1'" in err, err


# ------------------------------------------------------------------ SQLite: kill and resume
def _count(db: Path, state: str) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return c.execute("SELECT count(*) FROM trials WHERE state=?", (state,)).fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet, or locked
        return 0


@needs_fmnist
def test_sqlite_study_resumes_after_a_kill(tmp_path, converted_model):
    out, n = tmp_path / "tune", 8
    args = [*TINY_CONVERTED, "--checkpoint", converted_model, "--n-trials", n, "--out", out]
    first = _tune(*args)
    deadline = time.monotonic() + 180
    db = out / "study.db"
    while not (_count(db, "COMPLETE") >= 1 and _count(db, "RUNNING") == 1):  # mid-trial
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    killed_at = _count(db, "COMPLETE")
    assert 1 <= killed_at < n and _count(db, "RUNNING") == 1, killed_at
    second = _tune(*args)
    stdout, stderr = second.communicate(timeout=240)
    assert second.returncode == 0, stderr
    study = optuna.load_study(study_name="stas-tune", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == n and "RUNNING" not in states and "WAITING" not in states
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    # the trial killed mid-run is failed (stale heartbeat) and re-run with its parameters
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and len(states) == n + 1, states
    retries = [r for r in study.trials if r.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    # every parameter the killed trial had drawn is re-used (a kill between two draws
    # leaves some undrawn, and the retry draws those afresh)
    assert failed[0].params.items() <= retries[0].params.items()
    summary = json.loads(stdout)
    assert summary["complete_trials"] == n
    assert summary["baseline"]["t"] == [1, 2]  # the converted model without halting
    for name in ("pareto.json", "pareto.csv", "best.json", "trials.png", "trials.jsonl"):
        assert (out / name).exists(), name
    assert len((out / "trials.jsonl").read_text().splitlines()) == len(states)
    # best.json goes back into stas-convert
    from convert.cli import build_parser as convert_parser

    best = json.loads((out / "best.json").read_text())
    argv = ["vit_tiny", "--config", str(out / "best.json")]
    p = convert_parser()
    apply_config_file(p, argv)
    args = p.parse_args(argv)
    assert (args.halting, args.timesteps, args.halting_score, args.alpha, args.beta, args.eps) \
        == (True, 2, "convergence", best["alpha"], best["beta"], best["eps"])


# ------------------------------------------------------------------ PostgreSQL: two workers
@needs_fmnist
def test_two_workers_share_one_postgres_study(tmp_path, converted_model, postgres_url):
    n = 6
    args = [*TINY_CONVERTED, "--checkpoint", converted_model, "--n-trials", n,
            "--storage", postgres_url, "--study-name", "shared", "--out", tmp_path / "tune"]
    workers = [_tune(*args, "--seed", 0), _tune(*args, "--seed", 0)]
    results = [w.communicate(timeout=300) for w in workers]
    for w, (_, err) in zip(workers, results):
        assert w.returncode == 0, err
    # (SQLAlchemy 2.1 maps postgresql:// to psycopg 3; open_storage picks the installed driver)
    study = optuna.load_study(study_name="shared", storage=open_storage(postgres_url))
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * n, states
    assert sorted(t.number for t in study.trials) == list(range(n))  # none duplicated or lost
    ran = [json.loads(out)["trials_run_here"] for out, _ in results]
    assert sum(ran) == n, ran
    params = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(params) == n  # the workers did not draw the same settings
    pareto = json.loads((tmp_path / "tune" / "pareto.json").read_text())
    assert pareto["storage"] == postgres_url and pareto["complete_trials"] == n


# ------------------------------------------------------------------ the direct path
@needs_fmnist
def test_direct_path_study_and_best_json_round_trip(tmp_path, capsys):
    from stas_core.cli.train import build_parser as train_parser
    from stas_core.cli.train import main as train_main
    from stas_core.train import TrainConfig, train

    # stage 1 with non-default optimiser and neuron settings: the trials inherit them
    stage1 = train(TrainConfig(model="spikformer-1-32", timesteps=2, train_subset=256,
                               val_subset=128, batch_size=64, epochs=1, energy_images=32,
                               lr=1e-3, warmup_epochs=0.3, neuron={"tau": 1.5,
                                                                   "surrogate": "atan"},
                               progress=False, out=str(tmp_path / "s1")))
    out = tmp_path / "tune"
    code = tune_main(["--path", "direct", "--checkpoint", stage1["checkpoint"], "--n-trials", "2",
                      "--trial-epochs", "1", "--train-subset", "64", "--val-subset", "32",
                      "--energy-images", "16", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["complete_trials"] == 2 and summary["path"] == "direct"
    # the stage-1 model without halting after t = 1, 2: drawn and placed against
    assert summary["baseline"]["t"] == [1, 2] and (out / "baseline.json").is_file()
    assert all("beats_baseline" in p["vs_baseline"] for p in summary["pareto"])
    for name in ("pareto.json", "pareto.csv", "best.json", "trials.png", "trials.jsonl"):
        assert (out / name).exists(), name
    assert (out / "trials.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "pareto.csv").read_text().splitlines()[0] == \
        "number,alpha,beta,eps,delta_p,top1,objective_energy_mj,energy_mj,token_ratio"
    front = json.loads((out / "pareto.json").read_text())["pareto"]
    assert front and all(0 < p["token_ratio"] <= 1 and p["energy_mj"] > 0 for p in front)
    assert (out / "trials" / "0" / "summary.json").exists()  # each trial's own run
    # trials report on held-out training images; the chosen one is measured on the test split
    trial = json.loads((out / "trials" / "0" / "summary.json").read_text())
    assert trial["reported_on"] == "val" and trial["provenance"]["images"]["val"]["images"] == 32
    held = summary["best_on_test"]
    assert held["split"] == "test" and held["provenance"]["images"]["test"]["split"] == "test"
    assert held["provenance"]["chose_on"] == "val" and held["baselines"]["images"] == 32
    assert held["top1"] == held["baselines"]["halted"]["top1"]
    best = json.loads((out / "best.json").read_text())
    assert best["halting"] is True and best["init_from"] == stage1["checkpoint"]
    argv = ["--direct", "--config", str(out / "best.json"), "--out", str(tmp_path / "s2")]
    p = train_parser()
    apply_config_file(p, argv)
    args = p.parse_args(argv)
    assert (args.halting, args.init_from, args.model, args.timesteps) == \
        (True, stage1["checkpoint"], "spikformer-1-32", 2)
    assert (args.alpha, args.beta, args.eps, args.delta_p) == \
        (best["alpha"], best["beta"], best["eps"], best["delta_p"])
    # --config best.json trains what was tuned: every option of the trials' runs
    from stas_core.checkpoint import read_header
    from stas_core.cli.train import config_from_args

    tuned = read_header(out / "trials" / "0" / "last.safetensors")["config"]
    tuned.update({k: best[k] for k in ("alpha", "beta", "eps", "delta_p")})
    again = dataclasses.asdict(config_from_args(args).resolved())
    where = ("out", "progress", "device", "workers", "resume", "report_split")
    assert {k: v for k, v in again.items() if k not in where} == \
        {k: v for k, v in tuned.items() if k not in where}
    assert (again["lr"], again["neuron"]["tau"], again["neuron"]["surrogate"]) == (1e-3, 1.5, "atan")
    # --trial-lr: the trials fine-tune at their own learning rate instead
    from tuning.objectives import DirectTrial

    lower = DirectTrial(stage1["checkpoint"], tmp_path / "t2", lr=5e-4, train_subset=64,
                        val_subset=32)
    assert lower.base.lr == 5e-4 and lower.defaults()["lr"] == 5e-4
    # and a tiny stage-2 run from it: explicit flags next to --config
    code = train_main(["--direct", "--config", str(out / "best.json"), "--epochs", "1",
                       "--train-subset", "64", "--val-subset", "32", "--batch-size", "32",
                       "--energy-images", "16", "--no-progress", "--out", str(tmp_path / "s2")])
    assert code == 0, capsys.readouterr().err
    stage2 = json.loads((tmp_path / "s2" / "summary.json").read_text())
    assert stage2["halting"]["alpha"] == best["alpha"] and stage2["halting"]["delta_p"] == best["delta_p"]


def test_energy_model_full_minimises_the_full_ledger(tmp_path):
    """--energy-model full: the study's energy is the trial's full ledger; both figures
    stay in trials.jsonl; the same study under the other energy model is refused."""
    ckpt = _fake_checkpoint(tmp_path / "m.safetensors", "stas-converted/1")

    def fake(params, number, on_epoch):  # the cheapest conventionally is the dearest in full
        return {"top1": 0.5, "energy_mj": 1.0 + params["eps"],
                "full_energy_mj": 10.0 - params["eps"], "token_ratio": 1.0}

    cfg = TuneConfig(path="converted", checkpoint=str(ckpt), out=str(tmp_path / "t"),
                     n_trials=4, energy_model="full", ranges=("eps=0:0.5",))
    run_study(cfg, evaluate=fake)
    records = [json.loads(x) for x in (tmp_path / "t" / "trials.jsonl").read_text().splitlines()]
    for r in records:
        # the objective has its own key; energy_mj stays the conventional figure
        assert r["objective_energy_mj"] == r["full_energy_mj"] == pytest.approx(
            10.0 - r["params"]["eps"])
        assert r["energy_mj"] == pytest.approx(1.0 + r["params"]["eps"])
    best = json.loads((tmp_path / "t" / "best.json").read_text())
    assert best["eps"] == max(r["params"]["eps"] for r in records)
    cfg.energy_model = "conventional"
    with pytest.raises(Exception, match="created with --energy-model full"):
        run_study(cfg, evaluate=fake)
    with pytest.raises(ConfigError, match="energy_model must be one of conventional, full"):
        TuneConfig(path="converted", checkpoint=str(ckpt), energy_model="joules").validate()


def test_a_fresh_converted_study_starts_from_the_measured_operating_point(tmp_path):
    """Trial 0 of a converted study is SpikingViT.halting_defaults' alpha/beta/eps (the
    best measured point) where the space holds it; a joined study does not re-queue it,
    and a study on another score (the point was measured with 'convergence') skips it."""
    from convert.spiking_vit import SpikingViT

    d = SpikingViT.halting_defaults
    ckpt = _fake_checkpoint(tmp_path / "m.safetensors", "stas-converted/1")
    seen = []

    def fake(params, number, on_epoch):
        seen.append(dict(params))
        return {"top1": 0.5, "energy_mj": 1.0 + params["eps"], "token_ratio": 1.0}

    cfg = TuneConfig(path="converted", checkpoint=str(ckpt), out=str(tmp_path / "t"), n_trials=2)
    run_study(cfg, evaluate=fake)
    assert seen[0] == {"alpha": d.alpha, "beta": d.beta, "eps": d.eps} != seen[1]
    cfg.n_trials = 3  # joining the stored study: no second copy of the start point
    run_study(cfg, evaluate=fake)
    assert seen[2] != seen[0] and len(seen) == 3
    seen.clear()
    run_study(TuneConfig(path="converted", checkpoint=str(ckpt), out=str(tmp_path / "m"),
                         n_trials=1, halting_score="mean"), evaluate=fake)
    assert seen[0] != {"alpha": d.alpha, "beta": d.beta, "eps": d.eps}
    seen.clear()
    run_study(TuneConfig(path="converted", checkpoint=str(ckpt), out=str(tmp_path / "r"),
                         n_trials=1, ranges=("beta=-2:-1",)), evaluate=fake)
    assert -2 <= seen[0]["beta"] <= -1  # the point lies outside: not queued
