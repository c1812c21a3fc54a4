"""Injectors that wrap an unmodified timm ViT: removable, neutral when fresh, and doing what they claim."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Attention

from carecl.tuners.moe_adapter import MoEAdapterConfig, MoEAdapterInjector
from carecl.tuners.sema import SEMAConfig, SEMAInjector
from carecl.tuners.adapter import AdapterConfig, ParallelAdapterInjector
from carecl.tuners.brmoe.config import BRMoEConfig
from carecl.tuners.brmoe.model import BRMoEViT
from carecl.tuners.adapter_bank import AdapterBankInjector
from carecl.tuners.prefix import Prefix, PrefixInjector
from carecl.tuners.prompt_tokens import PromptTokenInjector
from carecl.tuners.ssf import SSFConfig, SSFInjector
from carecl.tuners.vpt import VPTConfig, VPTInjector

from helpers import tiny_vit


def images():
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def brmoe(vit):
    model = BRMoEViT(vit, BRMoEConfig(adapter_dim=8, expert_dim=4))
    model.add_task(2)
    return model


INJECTORS = {
    "adapter": lambda vit: ParallelAdapterInjector(vit, AdapterConfig(bottleneck=8)),
    "adapter_learned_scale": lambda vit: ParallelAdapterInjector(vit, AdapterConfig(bottleneck=8, scale=None,
                                                                                   layer_norm=True)),
    "ssf": lambda vit: SSFInjector(vit, SSFConfig()),
    "vpt_shallow": lambda vit: VPTInjector(vit, VPTConfig(n_prompts=3)),
    "vpt_deep": lambda vit: VPTInjector(vit, VPTConfig(n_prompts=3, deep=True)),
    "prefix": lambda vit: PrefixInjector(vit),
    "adapter_bank": lambda vit: bank_with_sets(vit),
    "prompt_tokens": lambda vit: PromptTokenInjector(vit),
    "brmoe": brmoe,
    "moe_adapter": lambda vit: routed_moe(vit),
    "sema": lambda vit: SEMAInjector(vit, SEMAConfig(bottleneck=4, rd_dim=8, first_expandable=1, last_expandable=1)),
}


def routed_moe(vit) -> MoEAdapterInjector:
    injector = MoEAdapterInjector(vit, MoEAdapterConfig(experts=3, top_k=2, bottleneck=8))
    injector.route = injector.add_router()
    return injector


def bank_with_sets(vit) -> AdapterBankInjector:
    bank = AdapterBankInjector(vit, AdapterConfig(bottleneck=8))
    bank.add_set(), bank.add_set()
    return bank


def perturb(injector) -> None:
    """Move every injected parameter away from its initial value."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in injector.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def run(injector, x):
    """The injected forward: prefix attention needs prefixes set, BR-MoE its own forward."""
    if isinstance(injector, PrefixInjector):
        g = torch.Generator().manual_seed(3)
        width = injector.vit.embed_dim
        prefixes = {i: Prefix(torch.randn(x.shape[0], 2, width, generator=g), torch.randn(x.shape[0], 2, width, generator=g))
                    for i in injector.block_indices}
        with injector.prefixes(prefixes):
            return injector.vit.forward_features(x)
    if isinstance(injector, AdapterBankInjector):
        with injector.using(1):
            return injector.vit.forward_features(x)
    if isinstance(injector, PromptTokenInjector):
        prompts = torch.randn(x.shape[0], 3, injector.vit.embed_dim, generator=torch.Generator().manual_seed(4))
        with injector.inserting(prompts):
            return injector.vit.forward_features(x)
    if isinstance(injector, BRMoEViT):
        injector.layers.train(False)
        return injector(x).features[:, None]  # the CLS token alone
    return injector.vit.forward_features(x)


@pytest.mark.parametrize("name", sorted(INJECTORS))
def test_injected_then_removed_gives_the_unmodified_outputs(name):
    vit, x = tiny_vit(), images()
    with torch.no_grad():
        reference = vit.forward_features(x)
        injector = INJECTORS[name](vit)
        perturb(injector)
        changed = run(injector, x)
        assert not torch.allclose(changed[:, 0], reference[:, 0], atol=1e-4), "the injection must change the output"
        assert injector.remove() is vit
        restored = vit.forward_features(x)
    torch.testing.assert_close(restored, reference, rtol=0, atol=0)
    assert all(type(block.attn) is Attention for block in vit.blocks)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in vit.modules())
    assert not injector.injected


@pytest.mark.parametrize("name", ["adapter", "adapter_learned_scale", "ssf", "prefix", "adapter_bank", "prompt_tokens",
                                  "moe_adapter", "sema"])
def test_a_fresh_injection_leaves_outputs_unchanged(name):
    vit, x = tiny_vit(), images()
    with torch.no_grad():
        reference = vit.forward_features(x)
        INJECTORS[name](vit)
        injected = vit.forward_features(x)  # prefix, bank, prompt tokens: none chosen for this forward
    torch.testing.assert_close(injected, reference, rtol=0, atol=0)


def test_zero_prompts_leave_outputs_unchanged():
    for deep in (False, True):
        vit, x = tiny_vit(), images()
        with torch.no_grad():
            reference = vit.forward_features(x)
            VPTInjector(vit, VPTConfig(n_prompts=0, deep=deep))
            torch.testing.assert_close(vit.forward_features(x), reference, rtol=0, atol=0)


def test_empty_prefix_takes_the_written_out_path_to_the_same_result():
    vit, x = tiny_vit(), images()
    with torch.no_grad():
        reference = vit.forward_features(x)
        injector = PrefixInjector(vit)
        empty = torch.zeros(3, 0, vit.embed_dim)
        with injector.prefixes({i: Prefix(empty, empty) for i in range(len(vit.blocks))}):
            written_out = vit.forward_features(x)
    torch.testing.assert_close(written_out, reference, rtol=1e-5, atol=1e-5)


def test_prefix_attention_is_softmax_over_prefix_and_token_keys():
    vit = tiny_vit()
    attention = vit.blocks[0].attn
    x = torch.randn(2, 5, vit.embed_dim)
    keys, values = torch.randn(2, 3, vit.embed_dim), torch.randn(2, 3, vit.embed_dim)
    injector = PrefixInjector(vit, blocks=[0])
    with torch.no_grad(), injector.prefixes({0: Prefix(keys, values)}):
        out = vit.blocks[0].attn(x)
        # By hand, one head at a time: project, prepend, attend, merge, project out.
        q, k, v = attention.qkv(x).chunk(3, dim=-1)
        heads, width = attention.num_heads, attention.head_dim
        merged = []
        for h in range(heads):
            part = slice(h * width, (h + 1) * width)
            all_k = torch.cat([keys[..., part], k[..., part]], dim=1)
            all_v = torch.cat([values[..., part], v[..., part]], dim=1)
            weights = (q[..., part] @ all_k.transpose(1, 2) / width ** 0.5).softmax(-1)
            merged.append(weights @ all_v)
        expected = attention.proj(torch.cat(merged, dim=-1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_score_hook_sees_the_prefix_columns_and_can_gate_them_off():
    vit, x = tiny_vit(), images()
    injector = PrefixInjector(vit)
    seen = []

    def close_the_prefix(block, scores, n_prefix):
        seen.append((block, scores.shape, n_prefix))
        scores = scores.clone()
        scores[..., :n_prefix] = float("-inf")
        return scores

    g = torch.Generator().manual_seed(4)
    prefix = Prefix(torch.randn(3, 2, vit.embed_dim, generator=g), torch.randn(3, 2, vit.embed_dim, generator=g))
    with torch.no_grad():
        reference = vit.forward_features(x)
        injector.score_hook = close_the_prefix
        with injector.prefixes({0: prefix, 1: prefix}):
            gated = vit.forward_features(x)
    n_tokens = 1 + (16 // 4) ** 2
    assert seen == [(0, torch.Size([3, 2, n_tokens, n_tokens + 2]), 2), (1, torch.Size([3, 2, n_tokens, n_tokens + 2]), 2)]
    torch.testing.assert_close(gated, reference, rtol=1e-5, atol=1e-5)


def test_deep_prompts_are_per_block_and_shallow_prompts_travel():
    x = images()
    outputs = {}
    for deep in (False, True):
        vit = tiny_vit()
        injector = VPTInjector(vit, VPTConfig(n_prompts=2, deep=deep))
        with torch.no_grad():
            before = vit.forward_features(x)
            injector.prompts[-1].add_(torch.randn(injector.prompts[-1].shape))  # the last block's set (deep), the only one (shallow)
            after = vit.forward_features(x)
        outputs[deep] = (before, after)
        assert before.shape == (3, 1 + 16, vit.embed_dim)  # prompts dropped after the last block
    assert injector.prompts.shape == (len(vit.blocks), 2, vit.embed_dim)
    for before, after in outputs.values():
        assert not torch.allclose(before, after)


def test_ssf_follows_every_target_layer():
    vit = tiny_vit()
    injector = SSFInjector(vit, SSFConfig())
    names = set(injector.factors)
    assert {"patch_embed_proj", "norm", "blocks_0_attn_qkv", "blocks_1_mlp_fc2"} <= names
    assert len(names) == 2 + 6 * len(vit.blocks)
    with pytest.raises(ValueError, match="not a module"):
        SSFInjector(tiny_vit(), SSFConfig(block_targets=["attn.qkvv"]))


@pytest.mark.parametrize("name", ["adapter", "ssf", "vpt_shallow", "vpt_deep", "prefix", "adapter_bank", "moe_adapter",
                                  "sema"])
def test_bypassed_injection_computes_the_frozen_vit(name):
    vit, x = tiny_vit(), images()
    with torch.no_grad():
        reference = vit.forward_features(x)
        injector = INJECTORS[name](vit)
        perturb(injector)
        with injector.bypassed():
            frozen = run(injector, x)
        changed = run(injector, x)
    torch.testing.assert_close(frozen, reference, rtol=0, atol=0)
    assert not torch.allclose(changed, reference, atol=1e-4)
