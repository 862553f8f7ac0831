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
