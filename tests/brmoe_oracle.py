"""Dense reference of the BR-MoE equations (spec §2-§3), for tests only.

Written straight from the spec with explicit loops: every expert runs on every token, router
scores are padded with -inf, the release's -100 masking is applied literally and the softmax
runs over all experts. It reads the parameters of a BRMoEViT and recomputes its forwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adapter(params, x, eps=1e-5):
    """s ⊙ (W_up ReLU(W_down LN(x) + b_down) + b_up), from raw parameters (eval: no dropout)."""
    normed = F.layer_norm(x, x.shape[-1:], params.norm.weight, params.norm.bias, eps)
    hidden = torch.relu(normed @ params.down_proj.weight.T + params.down_proj.bias)
    return params.scale * (hidden @ params.up_proj.weight.T + params.up_proj.bias)


def perceptron(params, c, eps=1e-5):
    norm, linear = params[0], params[1]
    return F.layer_norm(c, c.shape[-1:], norm.weight, norm.bias, eps) @ linear.weight.T + linear.bias


def entropy(logits):
    p = torch.softmax(logits, dim=-1)
    return -(p * torch.log(p + 1e-10)).sum(dim=-1)


def dense_brmoe(layer, z_a, task, topk_experts, topk_routers):
    """BRMoE(z_a) and (task-known) H_task(c_task) for one block, all dense."""
    n_tasks = len(layer.experts)
    n_experts = n_tasks if task is None else task + 1
    outputs = [adapter(layer.experts[e], z_a) for e in range(n_experts)]  # each (B, N, C)
    shared = adapter(layer.shared, z_a)
    cls_outputs = [o[:, 0] for o in outputs]
    logits = None if task is None else perceptron(layer.perceptrons[task], cls_outputs[task])
    if n_experts == 1:
        return outputs[0] + shared, logits

    candidates = n_experts if task is None else task
    entropies = torch.stack([entropy(perceptron(layer.perceptrons[i], cls_outputs[i])) for i in range(candidates)], 1)
    result = torch.empty_like(z_a)
    for b in range(z_a.shape[0]):
        order = torch.argsort(entropies[b]).tolist()
        if task is None:
            selected = order[:topk_routers]
        else:
            selected = [task] + order[: topk_routers - 1]
        mixture = torch.zeros_like(z_a[b])
        for router_index in selected:
            router = layer.routers[router_index]
            scores = cls_outputs[router_index][b] @ router.weight.T + router.bias
            padded = torch.full((n_experts,), float("-inf"), dtype=z_a.dtype)
            padded[: router_index + 1] = scores
            if topk_experts < n_experts:
                values, indices = torch.topk(padded, topk_experts)
                masked = torch.full_like(padded, -100.0)  # the release's fill value
                masked[indices] = values
            else:
                masked = padded
            weights = torch.softmax(masked, dim=0)
            for e in range(n_experts):
                mixture = mixture + weights[e] * outputs[e][b]
        result[b] = shared[b] + mixture
    return result, logits


def dense_forward(model, images, task=None):
    """(features (B, C), per-block perceptron logits or None) of `model` (a BRMoEViT), densely."""
    vit = model.vit
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    all_logits = []
    for block, layer in zip(vit.blocks, model.layers):
        z_a = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        mlp = block.drop_path2(block.ls2(block.mlp(block.norm2(z_a))))
        moe, logits = dense_brmoe(layer, z_a, task, model.config.topk_experts, model.config.topk_routers)
        x = z_a + mlp + moe
        all_logits.append(logits)
    features = vit.norm(x)[:, 0]
    return features, (None if task is None else all_logits)
