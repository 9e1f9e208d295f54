"""lora.packed: K adapters trained in one packed pass equal K sequential runs; routing is exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from numerics import F64_MODEL_ATOL
from torch import nn

from lora.errors import UserError
from lora.inject import inject_lora, lora_modules, mark_only_lora_trainable
from lora.packed import (
    AdapterSpec,
    PackedLoRALinear,
    concat_batches,
    pack_lora,
    route,
    train_packed,
    unpack_adapter,
)

SPECS = (AdapterSpec(r=2, alpha=2, seed=0), AdapterSpec(r=4, alpha=8, seed=0), AdapterSpec(r=4, alpha=4, seed=1))


class _Batch:  # a minimal batch type with the three fields the packer concatenates
    def __init__(self, input_ids, attention_mask, labels):
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels


@pytest.fixture
def tiny_cls():
    """A dropout-free 2-layer BERT classifier (d=32): packed and sequential runs must see identical maths."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _batches(steps: int, k: int) -> list[list[_Batch]]:
    """Per step, one batch per adapter; lengths differ so concatenation must pad and mask."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        row = []
        for j in range(k):
            n, T = 3 + j, 5 + 2 * j
            ids = torch.randint(1, 100, (n, T), generator=g)
            mask = torch.ones(n, T, dtype=torch.long)
            mask[0, T - 2:] = 0  # some padding inside a batch too
            row.append(_Batch(ids, mask, torch.randint(0, 3, (n,), generator=g)))
        out.append(row)
    return out


def _head_init(seed: int, head: nn.Module) -> None:
    """A task head drawn from the adapter's seed (as the trainer does), so the K heads start differently."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g, dtype=torch.float64) * 0.02)


def _train_sequential(base: nn.Module, spec: AdapterSpec, batches: list[_Batch], *, lr: float) -> nn.Module:
    model = copy.deepcopy(base)
    _head_init(spec.seed, model.classifier)
    inject_lora(model, ["q", "v"], r=spec.r, alpha=spec.alpha, seed=spec.seed)
    mark_only_lora_trainable(model, modules_to_save=["classifier"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01, foreach=False)
    model.train()
    for b in batches:
        loss = F.cross_entropy(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


@pytest.mark.float_sensitive
def test_packed_training_equals_sequential(tiny_cls):
    # float64 so that the only difference left (batched vs separate products) is float64 rounding, and a large
    # lr so that any cross-talk between adapters would show far above it (O(lr) = 1e-2). Adam's first step is
    # lr·g/(|g| + eps): for a gradient near eps = 1e-8 it turns an absolute gradient error δg into an update
    # error up to lr·δg/eps = 1e6·δg. With nearly uniform attention (tiny init weights) the softmax backward
    # cancels, and δg reaches 1e-13..1e-12, so the adapters differ by 1.6e-7 (MKL's and ATen's AVX2/AVX-512
    # kernels) to 1.5e-6 (ATEN_CPU_CAPABILITY=default), all from step 1 (measured). atol 1e-5 leaves ~7x above
    # that and stays 7x below a missing weight decay (7e-5); rtol 0, since the error is absolute.
    steps, lr = 4, 1e-2
    tiny_cls.double()
    batches = _batches(steps, len(SPECS))
    base = copy.deepcopy(tiny_cls)
    result = train_packed(tiny_cls, SPECS, batches, targets=["q", "v"], lr=lr, weight_decay=0.01,
                          modules_to_save=["classifier"], init_copy=lambda k, path, m: _head_init(SPECS[k].seed, m))
    assert len(result.losses) == steps and all(len(row) == len(SPECS) for row in result.losses)
    for k, spec in enumerate(SPECS):
        seq = _train_sequential(base, spec, [row[k] for row in batches], lr=lr)
        packed = unpack_adapter(result.model, k)
        seq_f, packed_f = lora_modules(seq), lora_modules(packed)
        assert seq_f.keys() == packed_f.keys() and len(seq_f) == 4
        for path in seq_f:
            a, b = seq_f[path].factors()[""], packed_f[path].factors()[""]
            assert a.rank == b.rank == spec.r and a.scaling == b.scaling
            assert b.B.abs().max() > 0  # it trained
            torch.testing.assert_close(b.A, a.A, atol=1e-5, rtol=0)
            torch.testing.assert_close(b.B, a.B, atol=1e-5, rtol=0)
        torch.testing.assert_close(packed.classifier.weight, seq.classifier.weight, atol=1e-5, rtol=0)


def test_init_matches_inject_lora(tiny_cls):
    single = copy.deepcopy(tiny_cls)
    inject_lora(single, ["q", "v"], r=4, alpha=4, seed=1)
    pack_lora(tiny_cls, ["q", "v"], SPECS)
    for path, m in lora_modules(single).items():
        packed = tiny_cls.get_submodule(path)
        assert isinstance(packed, PackedLoRALinear)
        torch.testing.assert_close(packed.lora_A[2], m.lora_A, atol=0, rtol=0)
        # nested draws: the rank-2 adapter of seed 0 starts as the first rows of the rank-4 adapter of seed 0
        torch.testing.assert_close(packed.lora_A[0], packed.lora_A[1][:2], atol=0, rtol=0)


@pytest.mark.float_sensitive
def test_routing_output_depends_only_on_own_adapter(tiny_cls):
    # float64: a group's rows and the single adapter's forward differ only in float64 rounding (batched vs
    # separate products, < 1e-12 on O(1) logits: numerics.F64_MODEL_ATOL), whatever kernels this CPU picks
    tiny_cls.double()
    pack_lora(tiny_cls, ["q", "v"], SPECS)
    tiny_cls.eval()
    g = torch.Generator().manual_seed(3)
    for m in tiny_cls.modules():
        if isinstance(m, PackedLoRALinear):
            for B in m.lora_B:
                B.data.copy_(torch.randn(B.shape, generator=g, dtype=torch.float64))
    batch, sizes = concat_batches([b for b in _batches(1, 3)[0]])
    bounds = torch.tensor((0,) + sizes).cumsum(0).tolist()

    def logits():
        with torch.no_grad(), route(tiny_cls, sizes):
            return tiny_cls(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    before = logits()
    # each group's output equals the unpacked single adapter's output on the same rows
    for k in range(3):
        single = unpack_adapter(tiny_cls, k).eval()
        rows = slice(bounds[k], bounds[k + 1])
        with torch.no_grad():
            ref = single(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits
        torch.testing.assert_close(before[rows], ref, atol=F64_MODEL_ATOL, rtol=0)
    # changing adapter 1 changes group 1 only, bit for bit
    for m in tiny_cls.modules():
        if isinstance(m, PackedLoRALinear):
            m.lora_B[1].data.mul_(3.0)
    after = logits()
    g1 = slice(bounds[1], bounds[2])
    assert not torch.allclose(after[g1], before[g1])
    assert torch.equal(after[: bounds[1]], before[: bounds[1]])
    assert torch.equal(after[bounds[2]:], before[bounds[2]:])


def test_routing_errors(tiny_cls):
    pack_lora(tiny_cls, ["q", "v"], SPECS)
    ids = torch.randint(1, 100, (6, 4))
    with pytest.raises(RuntimeError, match="no routing"):
        tiny_cls(input_ids=ids)
    with pytest.raises(ValueError, match="do not split"), route(tiny_cls, (1, 2, 2)):
        tiny_cls(input_ids=ids)
    with pytest.raises(ValueError, match="out of range"):
        unpack_adapter(tiny_cls, 3)


def test_bad_targets(tiny_gpt2, tiny_cls):
    with pytest.raises(UserError, match="nn.Linear targets only"):
        pack_lora(tiny_gpt2, ["q", "v"], SPECS)
    with pytest.raises(UserError, match="no adapters"):
        pack_lora(tiny_cls, ["q", "v"], ())
    with pytest.raises(ValueError, match="rank"):
        AdapterSpec(r=0, alpha=1)


@pytest.mark.float_sensitive
def test_a_run_of_equal_ranks_is_one_batched_product_with_each_adapters_output_and_gradient():
    # adapters 1..3 share rank, scale and group size: PackedLoRALinear computes them as one bmm run; adapter 0 and 4
    # differ (rank, then scale) and take the single-adapter path. Each group's output and each adapter's
    # gradient must equal those of a LoRALinear with that adapter alone on the same rows (float64).
    from lora.layers import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    specs = [AdapterSpec(r=2, alpha=2, seed=0), AdapterSpec(r=3, alpha=3, seed=0), AdapterSpec(r=3, alpha=3, seed=1),
             AdapterSpec(r=3, alpha=3, seed=2), AdapterSpec(r=3, alpha=6, seed=3)]
    packed = PackedLoRALinear(base, specs)
    assert packed._runs((4, 4, 4, 4, 4)) == [(0, 1), (1, 4), (4, 5)]
    assert packed._runs((4, 4, 3, 4, 4)) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]  # unequal sizes: no run
    with torch.no_grad():
        for B in packed.lora_B:
            B.copy_(torch.randn(B.shape, dtype=torch.float64))
    sizes = (4, 4, 4, 4, 4)
    x = torch.randn(sum(sizes), 7, 6, dtype=torch.float64)
    packed.sizes = sizes
    y = packed(x)
    (y ** 2).sum().backward()
    for k, (s, xk, yk) in enumerate(zip(specs, x.split(sizes), y.split(sizes), strict=True)):
        single = LoRALinear(base, r=s.r, alpha=s.alpha)
        with torch.no_grad():
            single.lora_A.copy_(packed.lora_A[k])
            single.lora_B.copy_(packed.lora_B[k])
        ref = single(xk)
        (ref ** 2).sum().backward()
        torch.testing.assert_close(yk, ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(packed.lora_A[k].grad, single.lora_A.grad, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(packed.lora_B[k].grad, single.lora_B.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kw, pack, reason", [
    ({"batch_size": 8, "max_length": 32}, True, "saves per-step overhead"),  # 256 tokens: the limit itself
    ({"batch_size": 4, "max_length": 16, "device": "cuda"}, True, "CUDA"),
    ({"batch_size": 32, "max_length": 32, "device": "cuda"}, True, "CUDA"),
    ({"batch_size": 8, "max_length": 33}, False, "no faster"),  # 264 tokens
    ({"batch_size": 32, "max_length": 32}, False, "no faster"),  # the default trainer step
    ({"batch_size": 4, "max_length": 16, "workers": 2}, False, "2 worker processes"),
    ({"batch_size": 4, "max_length": 16, "dropout": 0.1}, False, "dropout"),
    ({"batch_size": 4, "max_length": 16, "dropout": 0.1, "device": "cuda"}, False, "dropout"),
])
def test_pack_auto_rule(kw, pack, reason):
    from lora.packed import CPU_PACK_MAX_TOKENS, packing_pays

    assert CPU_PACK_MAX_TOKENS == 256
    got, why = packing_pays(**kw)
    assert got is pack and reason in why
