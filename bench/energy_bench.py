"""Energy under both ledgers; no timing involved.

    python bench/energy_bench.py lemaire [--out runs/bench]
    python bench/energy_bench.py figures --direct-stas CKPT --direct-backbone CKPT \\
        --converted MODEL [--converted-halting alpha,beta,eps] [--images 256] [--out runs/bench]

``lemaire``: spikingjelly 2.0's analytical estimator (``op_counter.estimate_lemaire_energy``,
after Lemaire et al. 2022) and our ledger on the same small spiking network (two Linear
layers, LIF neurons, the same weights and input spikes; spikingjelly's ``LIFNode`` and our
``LIF`` fire identically, checked), count by count where the definitions coincide, and
each model's own energy split. Needs ``pip install -e '.[bench]'`` (spikingjelly 2.0 and loguru).

``figures``: a direct-trained STAS model against its backbone, and a converted ViT against
its ANN and the equal-information quantized ANN, at every t, under both ledgers; the same
with the weights on chip (every buffer in SRAM) as a second hardware case. Prints one JSON
object, writes ``energy_<mode>.json`` (and ``energy_figures.png``) to ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from stas_core.provenance import provenance_of_args
from stas_core.checkpoint import atomic_write, atomic_write_text
from stas_core.energy import EnergyCosts, OpCounter


# ----------------------------------------------------------------------------- lemaire
class TwoLayer(nn.Module):
    def __init__(self, neuron) -> None:
        super().__init__()
        self.fc1, self.n1 = nn.Linear(64, 32, bias=False), neuron()
        self.fc2, self.n2 = nn.Linear(32, 10, bias=False), neuron()


def bench_lemaire(args) -> dict:
    try:
        from spikingjelly.activation_based import functional, neuron as sj_neuron
        from spikingjelly.activation_based.op_counter import estimate_lemaire_energy
    except ImportError as exc:
        raise SystemExit(f"spikingjelly is needed for this comparison ({exc}); "
                         "pip install -e '.[bench]'") from None
    from stas_core.neurons import LIF

    torch.manual_seed(0)
    T, B = 4, 8
    ours = TwoLayer(lambda: LIF(tau=2.0, v_threshold=1.0, v_reset=0.0)).eval()
    sj = TwoLayer(lambda: sj_neuron.LIFNode(tau=2.0, v_threshold=1.0, v_reset=0.0,
                                            decay_input=True, step_mode="s")).eval()
    sj.load_state_dict(ours.state_dict(), strict=False)
    with torch.no_grad():
        ours.fc1.weight.mul_(4.0)
        sj.fc1.weight.copy_(ours.fc1.weight)
        sj.fc2.weight.copy_(ours.fc2.weight.mul_(4.0))
    spikes = (torch.rand(T, B, 64) < 0.2).float()

    def run_ours(model, counter=None):
        for m in (model.n1, model.n2):
            m.reset()
        outs = []
        for t in range(T):
            if counter is not None:
                counter.set_timestep(t)
            outs.append(model.n2.single_step(model.fc2(model.n1.single_step(model.fc1(spikes[t])))))
        return torch.stack(outs)

    class SJRunner(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            functional.reset_net(self.net)
            return torch.stack([self.net.n2(self.net.fc2(self.net.n1(self.net.fc1(x[t]))))
                                for t in range(T)])

    with torch.no_grad():
        counter = OpCounter(ours)
        with counter:
            out_ours = run_ours(ours, counter)
            counter.add_images(B)
        runner = SJRunner(sj)
        out_sj = runner(spikes)
        report = estimate_lemaire_energy(runner, spikes)
    assert torch.equal(out_ours, out_sj), "the two LIF implementations disagree"
    s = counter.summary()
    led = s["ledger"]
    c = report.counts
    per = 1.0 / B  # spikingjelly counts the whole batch; ours is per image
    rows = [
        {"quantity": "synaptic ops (ACs: input spikes x fan-out)", "spikingjelly": c["synop"] * per,
         "ours": s["sops"], "coincide": True},
        {"quantity": "MACs", "spikingjelly": c["mac"] * per, "ours": s["macs"],
         "note": "Lemaire books a LIF update as one MAC; ours books it as a neuron update"},
        {"quantity": "neuron updates (sites x steps)", "spikingjelly": None,
         "ours": led["neuron_updates"]},
        {"quantity": "membrane bytes read + written by the neurons",
         "spikingjelly": (c["read_potential_bytes"] + c["write_potential_bytes"]) * per,
         "ours": led["traffic_bytes"].get("memory_state", 0.0),
         "note": "Lemaire also reads and writes a potential per synaptic event (event-driven "
                 "accumulation); ours accumulates in the layer and writes its partial sums "
                 "once (memory_activations)"},
        {"quantity": "weight bytes read", "spikingjelly": c["read_params_bytes"] * per,
         "ours": led["traffic_bytes"].get("memory_weights", 0.0),
         "note": "Lemaire reads a weight per synaptic event; ours reads each layer's weights "
                 "once per image and timestep (a weight-stationary array)"},
        {"quantity": "spike / activation bytes written and read",
         "spikingjelly": (c["read_in_bytes"] + c["write_out_bytes"]) * per,
         "ours": led["traffic_bytes"].get("memory_activations", 0.0),
         "note": "Lemaire: 32-bit words per spike event; ours: 1 bit per spike site, 32-bit "
                 "partial sums"},
    ]
    result = {
        "bench": "energy_lemaire", "network": "Linear(64,32)-LIF-Linear(32,10)-LIF, T=4, "
        "8 images of Bernoulli(0.2) input spikes", "spikes_identical": True,
        "rows": rows,
        "spikingjelly_pj_per_image": {k: v * per for k, v in report.breakdown_pj.items()},
        "spikingjelly_total_pj_per_image": report.total_pj * per,
        "ours_pj_per_image": {k: v * 1e9 for k, v in led["terms_mj"].items()},
        "ours_full_pj_per_image": led["full_mj"] * 1e9,
        "ours_conventional_pj_per_image": s["energy_mj"] * 1e9,
        "cost_models": {"spikingjelly": "int32 add 0.1 pJ, mult 3.1 pJ; SRAM 10/20/100 pJ per "
                        "32-bit access at 8 KB/32 KB/1 MB, interpolated",
                        "ours": dataclasses.asdict(EnergyCosts())},
    }
    return result


# ----------------------------------------------------------------------------- figures
def _loader(dataset: str, images: int) -> DataLoader:
    from stas_core.data import build_datasets

    _, val, _ = build_datasets(dataset, val_subset=images, augment=False)
    return DataLoader(val, batch_size=64, shuffle=False)


def _row(name: str, e: dict) -> dict:
    return {"model": name, "conventional_mj": e["conventional_mj"], "full_mj": e["full_mj"],
            "terms_mj": e["terms_mj"], "ann_conventional_mj": e["ann_conventional_mj"],
            "ann_full_mj": e["ann_full_mj"], "qann_bits": e["qann_bits"],
            "qann_full_mj": e["qann_full_mj"], "snn_vs_ann": e["snn_vs_ann"],
            "snn_vs_qann": e["snn_vs_qann"],
            "conventional_snn_vs_ann": e["conventional_snn_vs_ann"],
            "weights_on_chip": e["weights_on_chip"], "weight_bytes": e["weight_bytes"],
            "per_t": [{k: p[k] for k in ("t", "conventional_mj", "full_mj", "qann_bits",
                                         "qann_full_mj", "snn_vs_ann", "snn_vs_qann")}
                      for p in e["per_t"]]}


def bench_figures(args) -> dict:
    from halting import HaltingConfig
    from stas_core.evaluate import energy_report
    from stas_core.train import load_trained_model

    device = torch.device("cpu")
    cases = {"default (weights in DRAM unless they fit in 1 MB)": EnergyCosts(),
             "all on chip (SRAM, 1 MB price above 1 MB)": EnergyCosts(on_chip_bytes=1 << 40)}
    result = {"bench": "energy_figures", "images": args.images, "cases": {}}
    for case, costs in cases.items():
        rows = {}
        for name, path in (("direct STAS", args.direct_stas), ("direct backbone", args.direct_backbone)):
            if path is None:
                continue
            model, cfg = load_trained_model(path)
            e = energy_report(model, _loader(cfg.dataset, args.images), device,
                              max_images=args.images, costs=costs, halting=cfg.halting_config())
            rows[name] = _row(name, e["energy"])
            rows[name]["token_ratio"] = None
        if "direct STAS" in rows and "direct backbone" in rows:
            a, b = rows["direct STAS"], rows["direct backbone"]
            rows["halting saving (direct)"] = {
                "conventional": 1 - a["conventional_mj"] / b["conventional_mj"],
                "full": 1 - a["full_mj"] / b["full_mj"]}
        if args.converted:
            from convert.pipeline import load_converted

            snn = load_converted(args.converted)
            loader = _loader("fashion-mnist", args.images)
            e = energy_report(snn, loader, device, max_images=args.images, costs=costs)
            rows["converted ViT"] = _row("converted ViT", e["energy"])
            if args.converted_halting:
                alpha, beta, eps = (float(v) for v in args.converted_halting.split(","))
                h = HaltingConfig(alpha=alpha, beta=beta, eps=eps).for_model(snn)
                e_h = energy_report(snn, loader, device, max_images=args.images, costs=costs,
                                    halting=h)
                rows["converted ViT, halted"] = _row("converted ViT, halted", e_h["energy"])
                rows["halting saving (converted)"] = {
                    "conventional": 1 - e_h["energy"]["conventional_mj"] / e["energy"]["conventional_mj"],
                    "full": 1 - e_h["energy"]["full_mj"] / e["energy"]["full_mj"]}
        result["cases"][case] = rows
    _plot(result, Path(args.out) / "energy_figures.png")
    return result


def _plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    cases = list(result["cases"].items())
    fig = Figure(figsize=(6 * len(cases), 4.2))
    axes = fig.subplots(1, len(cases), squeeze=False)[0]
    for ax, (case, rows) in zip(axes, cases):
        for i, (name, r) in enumerate(r for r in rows.items() if "per_t" in r[1]):
            ts = [p["t"] for p in r["per_t"]]
            color = f"C{i}"
            ax.plot(ts, [p["full_mj"] for p in r["per_t"]], "o-", color=color, label=f"{name}: full")
            ax.plot(ts, [p["conventional_mj"] for p in r["per_t"]], "o:", color=color,
                    label=f"{name}: conventional")
            ax.plot(ts, [p["qann_full_mj"] for p in r["per_t"]], "x--", color=color, alpha=0.6,
                    label=f"{name}: equal-information QANN")
            ax.axhline(r["ann_full_mj"], color=color, ls="-.", alpha=0.6, label=f"{name}: ANN")
        ax.set_yscale("log")
        ax.set_xlabel("timesteps t")
        ax.set_ylabel("energy per image (mJ)")
        ax.set_title(case, fontsize=8)
        ax.legend(fontsize=5)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    lem = sub.add_parser("lemaire")
    lem.add_argument("--out", default="runs/bench")
    fig = sub.add_parser("figures")
    fig.add_argument("--direct-stas")
    fig.add_argument("--direct-backbone")
    fig.add_argument("--converted")
    fig.add_argument("--converted-halting", default=None, help="alpha,beta,eps")
    fig.add_argument("--images", type=int, default=256)
    fig.add_argument("--out", default="runs/bench")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    result = bench_lemaire(args) if args.mode == "lemaire" else bench_figures(args)
    images = {} if args.mode == "lemaire" else {"test": _loader("fashion-mnist",
                                                                args.images).dataset}
    result["provenance"] = provenance_of_args(args, images=images, reported="test")
    text = json.dumps(result, indent=2)
    atomic_write_text(Path(args.out) / f"energy_{args.mode}.json", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
