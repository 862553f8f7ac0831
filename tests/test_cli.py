"""What every command shares: each option explains itself in --help."""
import argparse

import pytest

from convert.cli import build_parser as convert_parser
from convert.cli_compare import build_parser as compare_parser
from convert.cli_export import build_parser as export_parser
from stas_core.cli.analyze import build_parser as analyze_parser
from stas_core.cli.infer import build_parser as infer_parser
from stas_core.cli.train import build_parser as train_parser
from tuning.cli import build_parser as tune_parser

PARSERS = [train_parser, convert_parser, tune_parser, export_parser, infer_parser,
           compare_parser, analyze_parser]


def _actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield parser.prog, action


@pytest.mark.parametrize("build", PARSERS, ids=lambda b: b.__module__)
def test_every_option_has_help_text(build):
    missing = [f"{prog} {'/'.join(a.option_strings) or a.dest}" for prog, a in _actions(build())
               if not (a.help or "").strip()]
    assert not missing, missing


@pytest.mark.parametrize("build", PARSERS, ids=lambda b: b.__module__)
def test_help_shows_every_set_default(build):
    parser = build()
    parsers = [parser] + [sub for a in parser._actions
                          if isinstance(a, argparse._SubParsersAction)
                          for sub in a.choices.values()]
    for p in parsers:
        text = " ".join(p.format_help().split())
        for prog, action in _actions(p):
            if action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
                continue  # None: decided later (the option's help says by what); flags
            if prog != p.prog:
                continue
            assert f"(default: {action.default})" in text, (prog, action.option_strings)


MODEL_COMMANDS = [train_parser, convert_parser, tune_parser, export_parser, infer_parser,
                  analyze_parser]


def _options(parser):
    return {opt for _, a in _actions(parser) for opt in a.option_strings}


@pytest.mark.parametrize("build", MODEL_COMMANDS, ids=lambda b: b.__module__)
def test_one_vocabulary_on_every_command_that_runs_a_model(build):
    """--config, --device, --out, --verbose everywhere a model runs; --no-progress where
    the command works long enough for a bar (export traces one batch)."""
    opts = _options(build())
    wanted = {"--config", "--device", "--out", "--verbose"}
    if build is not export_parser:
        wanted.add("--no-progress")
    assert wanted <= opts, sorted(wanted - opts)


@pytest.mark.parametrize("build", [tune_parser, export_parser, analyze_parser],
                         ids=lambda b: b.__module__)
def test_a_stas_checkpoint_is_always_given_as_checkpoint(build):
    assert "--checkpoint" in _options(build())


def test_config_file_reaches_a_subcommand(tmp_path):
    """stas-analyze similarity --config: the file's keys are the sub-command's options."""
    from stas_core.cli.common import _command_parser
    from stas_core.cli.config import apply_config_file

    cfg = tmp_path / "c.json"
    cfg.write_text('{"images": 7, "no_progress": true}')
    parser = analyze_parser()
    argv = ["similarity", "--checkpoint", "x", "--config", str(cfg)]
    apply_config_file(_command_parser(parser, argv), argv)
    args = parser.parse_args(argv)
    assert args.images == 7 and args.progress is False


@pytest.mark.parametrize("main_of", ["stas_core.cli.train", "convert.cli", "tuning.cli"])
def test_a_bad_energy_costs_file_is_one_line(tmp_path, capsys, main_of):
    import importlib

    bad = tmp_path / "costs.json"
    bad.write_text('{"dram_pj": "cheap"}')
    argv = {"stas_core.cli.train": ["--direct"], "convert.cli": ["vit_tiny", "--random-init"],
            "tuning.cli": ["--checkpoint", str(tmp_path / "x.safetensors")]}[main_of]
    code = importlib.import_module(main_of).main(argv + ["--energy-costs", str(bad),
                                                         "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "'dram_pj' must be a finite number >= 0, got 'cheap'" in err
    assert not (tmp_path / "o").exists()
