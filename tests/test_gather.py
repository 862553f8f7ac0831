"""The ``gather`` execution (active tokens only) gives the ``mask`` execution's results."""
import pytest
import torch

from convert.errors import ConversionError
from halting import HaltingConfig, HaltingConfigError, run_halting
from stas_core.energy import OpCounter
from stas_core.layers import TokenRows
from stas_core.models import create_model
from stas_core.neurons import LIF

from helpers import calibrate_bn, missing, tiny_converted_vit

CFG = HaltingConfig(alpha=1.0, beta=-0.5, eps=0.1)


def _model(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    x = torch.randn(4, 1, 28, 28)
    model = create_model(name, img_size=28, in_chans=1, timesteps=3, **kwargs)
    return calibrate_bn(model, x), x


def _both(model, x, cfg=CFG):
    out = {}
    for execution in ("mask", "gather"):
        with OpCounter(model) as counter:
            out[execution] = (run_halting(model, x, cfg, execution=execution), counter)
            counter.add_images(len(x))
    return out["mask"], out["gather"]


def _assert_same(mask, gather):
    (rm, cm), (rg, cg) = mask, gather
    assert torch.allclose(rm.logits, rg.logits, atol=1e-5), (rm.logits - rg.logits).abs().max()
    assert torch.equal(rm.depth, rg.depth)
    assert torch.equal(rm.active_fraction, rg.active_fraction)
    assert 0 < rm.token_ratio < 1  # some tokens halted: the check is not trivial
    sm, sg = cm.summary(), cg.summary()
    assert sg["sops"] == pytest.approx(sm["sops"], rel=1e-6)
    assert sg["macs"] == pytest.approx(sm["macs"], rel=1e-6)


@pytest.mark.parametrize("name", ["spikformer-2-32", "spikingformer-2-32"])
def test_gather_equals_mask_on_direct_models(name):
    model, x = _model(name)
    with torch.no_grad():
        _assert_same(*_both(model, x))


@pytest.mark.parametrize("mode", ["block", "time"])
def test_gather_equals_mask_in_every_accumulation_mode(mode):
    model, x = _model("spikformer-1-32", seed=1)
    cfg = HaltingConfig(alpha=1.0, beta=-0.5, eps=0.1, accumulate=mode)
    with torch.no_grad():
        (rm, _), (rg, _) = _both(model, x, cfg)
    assert torch.allclose(rm.logits, rg.logits, atol=1e-5)
    assert torch.equal(rm.depth, rg.depth)


def test_gather_equals_mask_with_the_sinabs_backend():
    model, x = _model("spikformer-1-32", backend="sinabs")
    with torch.no_grad():
        _assert_same(*_both(model, x))


def test_gather_gives_the_same_gradients_in_training():
    grads = {}
    for execution in ("mask", "gather"):
        model, x = _model("spikformer-1-32", seed=2)
        model.train()
        res = run_halting(model, x, CFG, execution=execution)
        (res.logits.square().mean() + 0.01 * res.ponder_loss).backward()
        grads[execution] = {n: p.grad.clone() for n, p in model.named_parameters()
                            if p.grad is not None}
    assert grads["mask"].keys() == grads["gather"].keys() and grads["mask"]
    for n, g in grads["mask"].items():
        assert torch.allclose(g, grads["gather"][n], atol=1e-5, rtol=1e-4), n


def test_gather_equals_mask_on_a_converted_vit():
    snn, x = tiny_converted_vit(images=3)
    cfg = HaltingConfig(alpha=1.0, beta=0.0, eps=0.2, score="mean")
    with torch.no_grad():
        _assert_same(*_both(snn, x, cfg))


@pytest.mark.parametrize("halted_kv", ["frozen", "drop"])
@pytest.mark.parametrize("mode", ["both", "block", "time"])
def test_compacted_rows_equal_the_masked_execution(mode, halted_kv):
    """The row execution of a converted block (state compacted to the active tokens,
    refilled in 'block' mode) gives the masked execution's logits, depths and op counts,
    and the same ledger terms for everything but the Linears (which the masked execution
    computes, and counts, on every row)."""
    snn, x = tiny_converted_vit(images=3, timesteps=4, depth=3)
    snn.set_halted_kv(halted_kv)
    cfg = HaltingConfig(alpha=1.0, beta=0.5, eps=0.3, score="mean", accumulate=mode)
    with torch.no_grad():
        mask, gather = _both(snn, x, cfg)
    _assert_same(mask, gather)
    assert torch.equal(mask[0].logits, gather[0].logits)
    lm, lg = mask[1].ledger()["terms_mj"], gather[1].ledger()["terms_mj"]
    for term in ("nonlinear", "compensation", "neuron", "memory_state", "memory_weights"):
        assert lg[term] == pytest.approx(lm[term], rel=1e-6), term
    if mode == "block":  # tokens stopped in one timestep are computed again in the next
        assert (mask[0].active_fraction[:, 0] == 1).all()


@pytest.mark.parametrize("mode", ["both", "time", "block"])
def test_stopped_rows_are_parked_only_where_tokens_can_return(mode):
    """Outside 'block' mode the plugin promises the active set only shrinks, and the
    compaction drops stopped rows instead of copying them aside; 'block' keeps them."""
    snn, x = tiny_converted_vit(images=3, timesteps=4, depth=2)
    cfg = HaltingConfig(alpha=1.0, beta=0.5, eps=0.3, score="mean", accumulate=mode)
    with torch.no_grad():
        mask = run_halting(snn, x, cfg, execution="mask")
        gather = run_halting(snn, x, cfg, execution="gather")
    assert torch.equal(mask.logits, gather.logits) and 0 < gather.token_ratio < 1
    parked = [bool(blk.held.parked) for blk in snn.blocks]
    assert any(parked) if mode == "block" else not any(parked)


def test_a_broken_no_refill_promise_is_an_error():
    snn, x = tiny_converted_vit(images=2)
    tokens = snn.pos_embed.shape[1]
    blk, some = snn.blocks[0], torch.ones(2, tokens, dtype=torch.bool)
    some[:, 1:] = False
    with torch.no_grad():
        snn.reset()
        snn.set_halting_refills(False)
        h = snn.tokens(x, 0)
        blk.step(h, torch.ones_like(some), gather=True)
        blk.step(h, some, gather=True)
        with pytest.raises(ConversionError, match="set_halting_refills"):
            blk.step(h, torch.ones_like(some), gather=True)
        snn.reset()  # the promise lasts one sample
        assert all(b.held.refills for b in snn.blocks)


def test_one_sample_runs_under_one_execution():
    snn, x = tiny_converted_vit(images=2)
    active = torch.ones(2, snn.pos_embed.shape[1], dtype=torch.bool)
    blk = snn.blocks[0]
    with torch.no_grad():
        h = snn.tokens(x, 0)
        blk.step(h, active, gather=True)
        with pytest.raises(ConversionError, match="reset"):
            blk.step(h, active)
        snn.reset()
        blk.step(h, active)
        with pytest.raises(ConversionError, match="reset"):
            blk.step(h, active, gather=True)


def test_rows_step_equals_a_masked_single_step():
    torch.manual_seed(0)
    active = torch.rand(3, 5) > 0.4
    rows = TokenRows.from_mask(active)
    dense, gathered = LIF(2.0, step_mode="s"), LIF(2.0, step_mode="s")
    for _ in range(3):
        x = torch.rand(3, 5, 4) * 3
        s_dense = dense.single_step(x, active.unsqueeze(-1))
        s_rows = gathered.rows_step(rows.gather(x), rows.index, 15)
        assert torch.equal(rows.scatter(s_rows), s_dense)
    assert torch.equal(gathered.v.view(3, 5, 4), dense.v)  # halted tokens' state frozen


@pytest.mark.parametrize("with_bn", [False, True])
def test_rows_step_in_place_kernel_equals_the_torch_ops(monkeypatch, with_bn):
    """At inference the rows kernel charges the dense membrane's rows where they lie (the
    same tensor is updated) and may fold an evaluation-mode BatchNorm in: the same spikes
    and state as the PyTorch-op path (gather, step, scatter; the BatchNorm module first),
    over steps whose active rows change."""
    from stas_core import kernels
    from stas_core.layers import TokenBN

    if kernels.load() is None:
        missing(f"the C++ kernels did not build: {kernels._state['why']}")
    g = torch.Generator().manual_seed(3)
    bn = TokenBN(24).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(24, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(24, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(24, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(24, generator=g) * 0.2)
    steps = [(torch.randn(6, 9, 24, generator=g) * 2, torch.rand(6, 9, generator=g) > p)
             for p in (0.0, 0.3, 0.6, 0.6)]
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("STAS_KERNELS", flag)
        neuron, out, ptrs = LIF(2.0, v_reset=None, step_mode="s"), [], set()
        with torch.no_grad():
            for x, active in steps:
                rows = TokenRows.from_mask(active)
                out.append(neuron.rows_step(rows.gather(x), rows.index, 54,
                                            bn=bn if with_bn else None))
                ptrs.add(neuron.v.data_ptr())
        runs[flag] = (out, neuron.v, ptrs)
    (s1, v1, p1), (s0, v0, _) = runs["1"], runs["0"]
    assert all(torch.equal(a, b) for a, b in zip(s1, s0)) and 0 < float(s1[0].mean()) < 1
    assert torch.allclose(v1, v0, atol=1e-6) if with_bn else torch.equal(v1, v0)
    assert len(p1) == 1  # one membrane tensor, updated in place


def test_unknown_execution_is_a_clear_error():
    model, x = _model("spikformer-1-32")
    with pytest.raises(HaltingConfigError, match="execution must be one of mask, gather"):
        run_halting(model, x, CFG, execution="sparse")


@pytest.mark.parametrize("execution", ["mask", "gather"])
def test_training_survives_when_at_most_one_token_is_left(execution):
    model, x = _model("spikformer-1-32", seed=3)
    model.train()
    x = x[:1]  # one image: after the first step only the forced-last token budget is left
    res = run_halting(model, x, HaltingConfig(alpha=1.0, beta=1e4), execution=execution)
    assert res.active_fraction[0, 0] == 1 and res.active_fraction[1:].sum() == 0
    res.logits.sum().backward()  # no "expected more than 1 value per channel"
    one = torch.zeros(1, 49, dtype=torch.bool)
    one[0, 3] = True
    model.reset()
    model.blocks[0].step(model.tokens(x, 0), one, gather=execution == "gather")


def test_gather_skips_blocks_with_no_active_token():
    """Every token halts early (beta 4): later blocks have no active token, so gather does
    not call them at all; results and op counts equal the mask execution's."""
    model, x = _model("spikformer-2-32", seed=2)
    cfg = HaltingConfig(alpha=0.0, beta=4.0, eps=0.1)
    with torch.no_grad():
        (rm, cm), (rg, cg) = _both(model, x, cfg)
    assert (rm.active_fraction == 0).any()  # the case is exercised
    assert torch.allclose(rm.logits, rg.logits, atol=1e-5) and torch.equal(rm.depth, rg.depth)
    assert cg.summary()["sops"] == pytest.approx(cm.summary()["sops"], rel=1e-6)
    calls = []
    blk = model.blocks[1]
    handle = blk.attn.register_forward_hook(lambda *a: calls.append(1)) \
        if hasattr(blk, "attn") else None
    with torch.no_grad():
        run_halting(model, x, cfg, execution="gather")
    if handle is not None:
        handle.remove()
        assert len(calls) < 3  # block 1 runs at fewer than all T = 3 timesteps


@pytest.mark.parametrize("per_image", [[1, 1, 1], [0, 2, 1], [3, 5, 8], [17] * 3])
def test_products_on_the_active_rows_are_the_dense_ones(per_image):
    """Q K^T and attn V computed on a padded layout of the active query rows (few per
    image: the class token late in a run), or on every token (all active: no gather),
    give the dense per-image products' rows bit for bit. One- and two-row matmuls round
    differently (another BLAS path), which the padding to at least 4 rows avoids."""
    from convert.ops import ProductRows, padded_slots

    b, n, heads, dim = 3, 17, 2, 16
    g = torch.Generator().manual_seed(len(per_image) + sum(per_image))
    active = torch.zeros(b, n, dtype=torch.bool)
    for i, k in enumerate(per_image):
        active[i, torch.randperm(n, generator=g)[:k]] = True
    rows = TokenRows.from_mask(active)
    assert rows.full == all(k == n for k in per_image)
    padded = padded_slots(rows)
    assert (padded is not None) == (max(per_image) <= n // 2)
    key_count = torch.randint(1, 5, (b * n, 1), generator=g).float()
    sums = {"qk": (torch.randn(b * n, dim, generator=g), torch.randn(b * n, dim, generator=g)),
            "av": (torch.rand(b * n, heads, n, generator=g), torch.randn(b * n, dim, generator=g))}
    dense_rows = TokenRows(torch.arange(b * n), b, n)  # the dense products, then the rows
    for kind, (sum_a, sum_b) in sums.items():
        dense = ProductRows(kind, dense_rows, heads, dim, key_count)
        mean = dense.mean(sum_b, None)
        want = dense.product(sum_a, mean).index_select(0, rows.index)
        ctx = ProductRows(kind, rows, heads, dim, key_count, padded)
        # the mean updated on the active rows of a stale one equals the dense division
        stale = mean.clone()
        stale.view(b, heads, n, -1)[active.unsqueeze(1).expand(b, heads, n)] = -7.0
        assert torch.equal(ctx.mean(sum_b, stale), mean)
        assert torch.equal(ctx.product(sum_a, mean), want), kind
