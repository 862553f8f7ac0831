"""The op counter against numbers counted by hand."""
import pytest
import torch
from torch import nn

from halting.protocol import run_stepwise
from stas_core.energy import EnergyCosts, OpCounter, is_spike_tensor
from stas_core.layers import SpikeMatMul
from stas_core.models import create_model
from stas_core.neurons import LIF

from helpers import calibrate_bn


class Tiny(nn.Module):
    """conv (real image) -> LIF -> linear (spikes) -> spike matmul."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.lif = LIF(v_threshold=0.5)
        self.fc = nn.Linear(4, 3, bias=False)
        self.mm = SpikeMatMul()

    def forward(self, img, spikes, a, b):
        self.conv(img)  # counted by its hook; the output is not needed
        self.lif.single_step(torch.ones(2, 3))
        return self.fc(spikes), self.mm(a, b)


def test_hand_counted_ops_and_energy():
    net = Tiny()
    img = torch.randn(1, 1, 4, 4)  # real-valued: MACs = out elements (2*4*4) * (1*3*3) = 288
    spikes = torch.tensor([[1., 0., 1., 1.],   # 3 spikes
                           [0., 0., 0., 1.]])  # 1 spike -> 4 spikes * fan-out 3 = 12 ACs
    a = torch.tensor([[1., 0.], [1., 1.]])     # column sums (over i): [2, 1]
    b = torch.tensor([[1., 1., 0.], [0., 1., 1.]])  # row sums (over j): [2, 2]
    # coinciding pairs: 2*2 + 1*2 = 6 ACs  (== (a @ b).sum() = [[1,1,0],[1,2,1]] -> 6)
    with OpCounter(net, EnergyCosts(mac_pj=4.6, ac_pj=0.9)) as counter:
        counter.set_timestep(0)
        net(img, spikes, a, b)
        counter.add_images(1)
    s = counter.summary()
    assert s["per_layer"]["conv"] == {"macs": 288.0, "sops": 0.0}
    assert s["per_layer"]["fc"] == {"macs": 0.0, "sops": 12.0}
    assert s["per_layer"]["mm"] == {"macs": 0.0, "sops": 6.0}
    assert s["macs"] == 288 and s["sops"] == 18
    assert s["energy_mj"] == pytest.approx((288 * 4.6 + 18 * 0.9) * 1e-9)
    # LIF fed 1.0 with tau 2: H = 0.5 >= 0.5 -> all 6 neurons fire
    assert s["firing_rates"]["lif"] == 1.0
    assert [p["t"] for p in s["per_timestep"]] == [0]


def test_spike_conv_counts_receptive_fields_exactly():
    conv = nn.Conv2d(2, 5, 3, padding=1, bias=False)
    x = torch.zeros(1, 2, 3, 3)
    x[0, 0, 0, 0] = 1  # corner spike: reaches the 2x2 output positions around it
    x[0, 1, 1, 1] = 1  # centre spike: reaches all 9 output positions
    with OpCounter(conv) as counter:
        conv(x)
        counter.add_images(1)
    assert counter.summary()["sops"] == (4 + 9) * 5


def test_forced_kind_and_detection():
    assert is_spike_tensor(torch.tensor([0., 1., 2.]))
    assert not is_spike_tensor(torch.tensor([0., 0.5]))
    assert not is_spike_tensor(torch.tensor([-1., 1.]))
    fc = nn.Linear(2, 4)
    fc.stas_input = "real"
    with OpCounter(fc) as counter:
        fc(torch.tensor([[1., 0.]]))
        counter.add_images(1)
    assert counter.summary()["macs"] == 8


@pytest.mark.parametrize("family", ["spikformer", "spikingformer"])
def test_isps_runs_patch_splitting_once(family):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    results = {}
    for sps in ("integrated", "vanilla"):
        torch.manual_seed(0)
        model = create_model(f"{family}-1-32", img_size=28, in_chans=1, timesteps=3, sps=sps)
        calibrate_bn(model, x)
        with OpCounter(model) as counter:
            run_stepwise(model, x, on_timestep=counter.set_timestep)
            counter.add_images(x.shape[0])
        results[sps] = counter.summary()
    first_conv = "patch_embed.convs.0"
    # the first conv reads the real image: MACs = 28*28*4 out elements * 9 per image per pass
    per_pass = 28 * 28 * 4 * 9
    assert results["integrated"]["per_layer"][first_conv]["macs"] == per_pass
    assert results["vanilla"]["per_layer"][first_conv]["macs"] == 3 * per_pass
    integ = results["integrated"]["per_timestep"]
    assert [p["t"] for p in integ] == [0, 1, 2]
    head_macs = results["integrated"]["per_layer"]["head"]["macs"] / 3  # 0 for spikformer
    assert integ[0]["macs"] == per_pass + head_macs
    assert integ[1]["macs"] == integ[2]["macs"] == head_macs  # cached tokens: no SPS ops


def test_multistep_and_stepwise_totals_agree():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    model = create_model("spikformer-1-32", img_size=28, in_chans=1, timesteps=2, sps="vanilla")
    calibrate_bn(model, x)
    totals = []
    for stepwise in (False, True):
        with torch.no_grad(), OpCounter(model) as counter:
            run_stepwise(model, x, on_timestep=counter.set_timestep) if stepwise else model(x)
            counter.add_images(x.shape[0])
        totals.append(counter.summary())
    assert totals[0]["sops"] > 0
    assert totals[0]["macs"] == pytest.approx(totals[1]["macs"])
    assert totals[0]["sops"] == pytest.approx(totals[1]["sops"], rel=1e-6)
    assert totals[0]["firing_rates"] == pytest.approx(totals[1]["firing_rates"])


@pytest.mark.parametrize("fused", [True, False])
def test_ann_macs_hand_counted_tiny_vit(fused):
    """torch's FLOP counter on a 1-block ViT: conv 4x8x16 + qkv 5x8x24 + attention
    2x5x5x8 + proj 5x8x8 + fc1/fc2 2x5x8x32 + head 8x3 = 4776 MACs, fused SDPA or not."""
    import timm

    from stas_core.energy import ann_macs

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4,
                            in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2).eval()
    vit.blocks[0].attn.fused_attn = fused
    got = ann_macs(vit, torch.randn(2, 1, 8, 8))
    assert got["macs"] == 512 + 960 + 400 + 320 + 2 * 1280 + 24


# --------------------------------------------------------------------------- full ledger
def _ledger_t0(counter):
    return counter.ledger()["per_timestep"][0]["terms_mj"]


def test_full_ledger_linear_on_known_spikes():
    """A Linear(4->3, bias) on 2 rows with 4 spikes, one image: every term by hand."""
    from stas_core.energy import EnergyCosts

    costs = EnergyCosts()
    fc = nn.Linear(4, 3)
    x = torch.tensor([[[1., 0., 1., 1.], [0., 0., 0., 1.]]])  # [1 image, 2 rows, 4]
    with OpCounter(fc, costs) as counter:
        counter.set_timestep(0)
        fc(x)
        counter.add_images(1)
    terms = _ledger_t0(counter)
    weight_bytes = 12 * 4  # 12 weights of 32 bits: on chip, an SRAM buffer of 48 bytes
    assert counter.weight_bytes == weight_bytes
    # synaptic: 4 spikes x 3 synapses = 12 adds, plus 6 bias adds (2 rows x 3 outputs)
    assert terms["synaptic"] * 1e9 == pytest.approx((12 + 6) * 0.9)
    # one weight fetch: 12 weights x 32 bits at the per-bit price of a 48-byte buffer
    per_bit = 10.0 * weight_bytes / 8192 / 64
    assert terms["memory_weights"] * 1e9 == pytest.approx(12 * 32 * per_bit)
    # the 6 partial sums (32 bits) written and read, in a 24-byte buffer
    assert terms["memory_activations"] * 1e9 == pytest.approx(2 * 6 * 32 * 10.0 * 24 / 8192 / 64)
    assert terms["neuron"] == terms["nonlinear"] == terms["memory_state"] == 0


def test_full_ledger_weights_from_dram_when_they_do_not_fit():
    from stas_core.energy import EnergyCosts

    fc = nn.Linear(4, 3, bias=False)
    with OpCounter(fc, EnergyCosts(on_chip_bytes=16)) as counter:  # 48 bytes > 16
        counter.set_timestep(0)
        fc(torch.ones(2, 4))  # two images (rows): each reads the weights once
        counter.add_images(2)
    assert _ledger_t0(counter)["memory_weights"] * 1e9 == pytest.approx(12 * 32 * 1950.0 / 64)


def test_full_ledger_one_neuron_update():
    """LIF tau 2 on 6 sites: 3 adds and a shift each; membrane read and written; spikes
    (1 bit) written and read."""
    lif = LIF(v_threshold=0.5)
    with OpCounter(lif) as counter:
        counter.set_timestep(0)
        lif.single_step(torch.ones(1, 6))
        counter.add_images(1)
    terms = _ledger_t0(counter)
    assert terms["neuron"] * 1e9 == pytest.approx(6 * (3 * 0.9 + 0.1))
    assert terms["memory_state"] * 1e9 == pytest.approx(2 * 6 * 32 * 10.0 * 24 / 8192 / 64)
    assert terms["memory_activations"] * 1e9 == pytest.approx(2 * 6 * 1 * 10.0 * 0.75 / 8192 / 64)


def test_full_ledger_one_compensated_layernorm_step():
    """Compensated LayerNorm on [1, 2, 4] with one token halted: 4 active elements, each
    4 adds + 3 multiplies (LayerNorm), 2 adds + 2 multiplies (compensation), total and
    emitted read and written (4 x 32 bits), the output written and read."""
    from convert.ops import Compensated

    norm = Compensated(nn.LayerNorm(4))
    active = torch.tensor([[[True], [False]]])
    with OpCounter(norm) as counter:
        counter.set_timestep(0)
        norm(torch.randn(1, 2, 4), active)
        counter.add_images(1)
    terms = _ledger_t0(counter)
    assert terms["nonlinear"] * 1e9 == pytest.approx(4 * (4 * 0.9 + 3 * 3.7))
    assert terms["compensation"] * 1e9 == pytest.approx(4 * 2 * (0.9 + 3.7))
    buffer = 8 * 4  # the state of one image: 8 elements of 32 bits
    assert terms["memory_state"] * 1e9 == pytest.approx(4 * 4 * 32 * 10.0 * buffer / 8192 / 64)
    assert terms["memory_activations"] * 1e9 == pytest.approx(2 * 4 * 32 * 10.0 * buffer / 8192 / 64)


@pytest.mark.parametrize("execution", ["gather", "mask"])
def test_halted_tokens_cost_nothing_in_any_term(execution):
    """Every token halts in block 0 at t = 0 (beta 10): at t = 1 no block runs, so no
    neuron, state or block-weight term; only the readout head (its weights, bias adds and
    logits) is left. Without halting the same timestep costs in every term. (The mask
    execution computes halted rows as zeros; its activation traffic is booked densely.)"""
    from halting import HaltingConfig
    from halting.plugin import run_halting
    from stas_core.energy import EnergyCosts

    torch.manual_seed(0)
    model = create_model("spikformer-2-32", timesteps=2, in_chans=1, img_size=28,
                         num_classes=10).eval()
    x = torch.randn(2, 1, 28, 28) * 3
    terms = {}
    for beta in (10.0, -10.0):
        with torch.no_grad(), OpCounter(model) as counter:
            run_halting(model, x, HaltingConfig(alpha=0.0, beta=beta, eps=0.01),
                        execution=execution, on_timestep=counter.set_timestep)
            counter.add_images(2)
        terms[beta] = counter.ledger()["per_timestep"][1]["terms_mj"]
    halted, running = terms[10.0], terms[-10.0]
    assert halted["neuron"] == halted["memory_state"] == 0
    head = model.head
    per_bit = EnergyCosts().weight_pj_per_bit(counter.weight_bytes)
    assert halted["memory_weights"] * 1e9 == pytest.approx(head.weight.numel() * 32 * per_bit)
    assert halted["synaptic"] * 1e9 == pytest.approx(head.out_features * 0.9)  # bias adds
    assert running["memory_weights"] > 10 * halted["memory_weights"]
    if execution == "gather":
        assert running["memory_activations"] > 10 * halted["memory_activations"]
    assert running["neuron"] > 0 and running["memory_state"] > 0


def test_ann_mode_counts_what_torch_counts_for_the_timm_vit():
    """The ANN a converted ViT stands for, booked through the SNN's own hooks (mode='ann',
    one step), has exactly the MACs torch's FLOP counter finds in the timm ViT."""
    import timm

    from convert.spiking_vit import SpikingViT
    from stas_core.energy import ann_macs

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4,
                            in_chans=1, num_classes=3, embed_dim=8, depth=2, num_heads=2).eval()
    snn = SpikingViT(vit, levels=4, timesteps=2)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad(), OpCounter(snn, mode="ann") as counter:
        run_stepwise(snn, x, 1, on_timestep=counter.set_timestep)
        counter.add_images(3)
    s = counter.summary()
    assert s["macs"] == ann_macs(vit, x)["macs"] and s["sops"] == 0
    terms = s["ledger"]["terms_mj"]
    assert terms["neuron"] == terms["compensation"] == terms["memory_state"] == 0
    assert terms["nonlinear"] > 0


def test_converted_products_are_counted():
    """Q K^T and attn V of a converted block reach the conventional counter too."""
    import timm

    from convert.spiking_vit import SpikingViT

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4,
                            in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2).eval()
    snn = SpikingViT(vit, levels=4, timesteps=2)
    with torch.no_grad(), OpCounter(snn) as counter:
        run_stepwise(snn, torch.randn(2, 1, 8, 8), on_timestep=counter.set_timestep)
        counter.add_images(2)
    layers = counter.summary()["per_layer"]
    assert layers["blocks.0.qk"]["sops"] > 0 and layers["blocks.0.av"]["sops"] > 0


@pytest.mark.parametrize("t, levels, bits", [(1, None, 1), (4, None, 3), (7, None, 3),
                                             (8, None, 4), (8, 8, 12), (1, 4, 5)])
def test_equal_information_bits(t, levels, bits):
    from stas_core.energy import equal_information_bits

    assert equal_information_bits(t, levels) == bits


@pytest.mark.parametrize("text, words", [
    ('{"dram_pj": -1}', "'dram_pj' must be a finite number >= 0, got -1"),
    ('{"dram": 1}', "unknown cost 'dram'"),
    ('{"weight_bits": 7.5}', "'weight_bits' must be a positive integer"),
    ('[1]', "expected a JSON object"),
    ('{', "not valid JSON"),
])
def test_energy_costs_file_errors(tmp_path, text, words):
    from stas_core.energy import EnergyCosts
    from stas_core.errors import ConfigError

    path = tmp_path / "costs.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        EnergyCosts.from_file(path)


def test_energy_costs_file_overrides(tmp_path):
    from stas_core.energy import EnergyCosts

    path = tmp_path / "costs.json"
    path.write_text('{"dram_pj": 1300, "weight_bits": 8}')
    c = EnergyCosts.from_file(path)
    assert (c.dram_pj, c.weight_bits, c.mac_pj) == (1300.0, 8, 4.6)
