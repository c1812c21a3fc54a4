"""Pre-train the demo's tiny ViT on generated stroke glyphs and save it as a package asset.

The demo needs a *pre-trained* frozen backbone, as every CaRE experiment has: a randomly
initialised ViT's CLS token barely depends on its input, so nothing downstream can learn.
No download is possible on CPU test machines, so this script makes one from generated data
that contains no digits: each class is a random glyph of three strokes; samples jitter it.

    python scripts/pretrain_demo_backbone.py   # ~1-2 min on 2 CPU cores, deterministic
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from carecl.data.glyphs import random_strokes, render_glyphs

MODEL_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4}
ASSET = Path(__file__).resolve().parents[1] / "src" / "carecl" / "assets" / "tiny_vit_glyphs.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--output", type=Path, default=ASSET)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    strokes = random_strokes(rng, args.classes)
    images, labels = render_glyphs(rng, strokes, args.per_class, MODEL_KWARGS["img_size"])
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=args.classes, **MODEL_KWARGS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = args.epochs * (len(labels) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(labels))
        correct = 0
        for start in range(0, len(labels) - 127, 128):
            batch = order[start : start + 128]
            logits = model(images[batch])
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += (logits.argmax(1) == labels[batch]).sum().item()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, train accuracy {correct / len(labels):.3f}")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.output), metadata={"recipe": "scripts/pretrain_demo_backbone.py", "model_kwargs": str(MODEL_KWARGS)})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
