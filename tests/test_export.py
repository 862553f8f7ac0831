"""ONNX export: onnxruntime reproduces PyTorch for both model kinds, with and without
halting; the CLIs; clear errors."""
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from halting import HaltingConfig
from stas_core.export import ExportError, InferenceGraph, export_onnx
from stas_core.models import create_model
from stas_core.onnx_runtime import OnnxModel

from helpers import calibrate_bn, needs_fmnist, tiny_converted_vit


def _direct(name="spikformer-1-32"):
    torch.manual_seed(0)
    x = torch.randn(6, 1, 28, 28)
    return calibrate_bn(create_model(name, img_size=28, in_chans=1, timesteps=2), x), x


def _parity(model, sample, path, halting, precision="float32"):
    """Export with --check, then compare every output on a batch of another size."""
    info = export_onnx(model, path, sample, halting=halting, check=True, precision=precision)
    assert info["max_abs_diff"] <= 1e-4 and info["top1_identical"] == 1.0
    x = torch.randn(5, *sample.shape[1:])
    with torch.no_grad():
        ref = InferenceGraph(model, model.timesteps, halting, precision)(x)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = OnnxModel(path)(x.numpy())
    assert list(got) == (["logits", "token_ratio", "depth"] if halting else ["logits"])
    for r, g in zip(ref, got.values()):
        assert np.abs(r.numpy() - g).max() <= 1e-4
    return got


@pytest.mark.parametrize("halting", [None, HaltingConfig(alpha=1.0, beta=-0.5, eps=0.1)])
def test_direct_model_parity(tmp_path, halting):
    model, x = _direct()
    got = _parity(model, x, tmp_path / "m.onnx", halting)
    if halting is not None:  # halting really happens inside the graph
        assert 0 < got["token_ratio"].mean() < 1


def test_spikingformer_with_halting_parity(tmp_path):
    model, x = _direct("spikingformer-1-32")
    _parity(model, x, tmp_path / "m.onnx", HaltingConfig(alpha=1.0, beta=-0.5, eps=0.1))


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("halting", [None, HaltingConfig(alpha=1.0, beta=0.0, eps=0.2,
                                                         score="mean")])
def test_converted_vit_parity(tmp_path, halting, precision):
    snn, x = tiny_converted_vit(images=4, timesteps=2, depth=1)
    got = _parity(snn, x, tmp_path / "m.onnx", halting, precision)
    if halting is not None:
        assert 0 < got["token_ratio"].mean() < 1
    assert next(snn.parameters()).dtype == torch.float32  # the float64 graph used a copy
    assert OnnxModel(tmp_path / "m.onnx").meta["precision"] == precision
    floats = {t.data_type for t in onnx.load(tmp_path / "m.onnx").graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)}
    assert floats == {onnx.TensorProto.DOUBLE if precision == "float64"
                      else onnx.TensorProto.FLOAT}  # the weights are stored as computed


def test_float64_export_of_a_model_with_padded_convolutions_is_a_clear_error(tmp_path):
    model, x = _direct()  # SPS convolutions have padding: no float64 Conv in onnxruntime
    with pytest.raises(ExportError, match="no float64 Conv.*Export this model in float32"):
        export_onnx(model, tmp_path / "m.onnx", x, precision="float64")
    with pytest.raises(ExportError, match="precision must be one of float32, float64"):
        export_onnx(model, tmp_path / "m.onnx", x, precision="float16")
    assert not list(tmp_path.iterdir())


def test_a_model_without_the_protocol_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="lacks reset, tokens, blocks, readout"):
        export_onnx(nn.Linear(4, 2), tmp_path / "m.onnx", torch.randn(2, 4))
    assert not list(tmp_path.iterdir())


def test_a_failed_check_leaves_nothing_behind(tmp_path):
    model, x = _direct()
    with pytest.raises(ExportError, match="does not reproduce PyTorch.*--precision float64"):
        export_onnx(model, tmp_path / "m.onnx", x, atol=-1.0)  # no difference passes
    assert not list(tmp_path.iterdir())


@needs_fmnist
def test_export_and_infer_clis(tmp_path, capsys):
    from convert.cli_export import main as export_main
    from stas_core.cli.infer import main as infer_main
    from stas_core.train import TrainConfig, train

    ckpt = train(TrainConfig(model="spikformer-1-32", timesteps=2, batch_size=32, epochs=1,
                             train_subset=64, val_subset=32, energy_images=8, progress=False,
                             out=str(tmp_path / "run")))["checkpoint"]
    onnx_path = tmp_path / "m.onnx"
    assert export_main([ckpt, "--out", str(onnx_path), "--check", "--halting", "--beta", "0",
                        "--sample-images", "8"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["kind"] == "direct" and exported["halting"]["beta"] == 0.0
    # the same command with the shared vocabulary: --checkpoint, and --out as a directory
    assert export_main(["--checkpoint", ckpt, "--out", str(tmp_path / "dir"),
                        "--sample-images", "4"]) == 0
    capsys.readouterr()
    assert (tmp_path / "dir" / "model.onnx").is_file()
    assert exported["top1_identical"] == 1.0
    assert infer_main([str(onnx_path), "--val-subset", "32", "--batch-size", "16",
                       "--no-progress", "--out", str(tmp_path / "inf")]) == 0
    report = json.loads((tmp_path / "inf" / "report.json").read_text())
    assert report["test_images"] == 32 and 0 <= report["top1"] <= 1
    assert report["images_per_s"] > 0 and 0 < report["token_ratio"] <= 1
    assert report["timesteps"] == 2 and report["dataset"] == "fashion-mnist"
    assert "CPUExecutionProvider" in report["providers"]
    import onnxruntime

    no_cuda = "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
    for device, words in (("tpu", "unknown device 'tpu'"),
                          *([("cuda", "no CUDA provider")] if no_cuda else [])):
        code = infer_main([str(onnx_path), "--device", device, "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and words in err, err


@pytest.mark.parametrize("argv, words", [
    (["nothing.safetensors", "--out", "m.onnx"], "nothing.safetensors"),
    (["--out", "m.onnx", "x"], None),
    (["--out", "m.onnx"], "no checkpoint given: pass CKPT or --checkpoint CKPT"),
    (["a.safetensors", "--checkpoint", "b.safetensors", "--out", "m.onnx"],
     "two checkpoints given"),
])
def test_export_cli_bad_input(tmp_path, capsys, monkeypatch, argv, words):
    from convert.cli_export import main as export_main

    monkeypatch.chdir(tmp_path)
    if words is None:  # a file that is not a checkpoint
        (tmp_path / "x").write_text("not a checkpoint")
    code = export_main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "error:" in err
    if words:
        assert words in err
    assert not (tmp_path / "m.onnx").exists()


@needs_fmnist
def test_export_cli_float64_converted_model_reproduces_pytorch(tmp_path, capsys):
    from convert.cli_export import main as export_main
    from convert.pipeline import ConvertConfig, convert
    from convert.timm_models import parse_model_kwargs
    from stas_core.cli.infer import main as infer_main

    report = convert(ConvertConfig(
        model="vit_tiny", model_kwargs=parse_model_kwargs("patch_size=7,depth=2,embed_dim=48,"
                                                          "num_heads=3"),
        random_init=True, timesteps=2, calib_images=16, train_subset=16, val_subset=16, batch_size=16,
        energy_images=8, out=str(tmp_path / "c"), progress=False))
    capsys.readouterr()
    onnx_path = tmp_path / "m.onnx"
    assert export_main([report["model_path"], "--out", str(onnx_path), "--precision", "float64",
                        "--check", "--atol", "1e-6", "--halting", "--sample-images", "8"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["kind"] == "converted" and exported["precision"] == "float64"
    assert exported["max_abs_diff"] <= 1e-6 and exported["top1_identical"] == 1.0
    assert infer_main([str(onnx_path), "--val-subset", "16", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "float64"
