"""Search the pair-memory settings (``eval.memory``) of a fusion checkpoint on its run's
validation split: the memory is built from the run's training split under the checkpoint's
weights, and each setting is scored by the mean of text->image and image->text R@1 and
R@10 over the whole validation split (the test split is never read).

    python scripts/tune_fusion_memory.py outputs/fusion/RUN/checkpoints/best.ckpt
    python scripts/tune_fusion_memory.py CKPT --manifest pairs.jsonl --top 10

The run directory (two levels above the checkpoint) must hold the run's ``split.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data.fusion import prepare_emoji, read_pairs  # noqa: E402
from modules.memory import memory_scores  # noqa: E402
from tasks import fusion as fusion_task  # noqa: E402

GRID = {"neighbours": [5, 10, 20], "temperature": [0.02, 0.05, 0.1],
        "text_weight": [0.5, 1.0, 1.5], "image_weight": [0.5, 1.0, 1.5],
        "hubness": [0, 5, 10, 20]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--manifest", type=Path, default=None,
                    help="the run's data.manifest (default: the emoji)")
    ap.add_argument("--top", type=int, default=10, help="settings shown, best first")
    args = ap.parse_args()
    module = fusion_task.FusionModule.from_checkpoint(args.ckpt)
    if module.sentences is None:
        sys.exit("error: the checkpoint has no sentence encoder, so no pair memory")
    split = json.loads((args.ckpt.resolve().parents[1] / "split.json").read_text())
    manifest = args.manifest or prepare_emoji() / "noto.jsonl"
    pairs = read_pairs(manifest, img_size=module.model_cfg["vision"]["img_size"])
    sets = {k: fusion_task._subset(pairs, [pairs.ids.index(i) for i in split[k]])
            for k in ("train", "val")}
    mean, std, L = module.meta["mean"], module.meta["std"], module.meta["max_text_len"]
    module.memory_source = fusion_task.Collate(sets["train"], module.tok, L, mean, std)
    memory = module.build_memory()
    val = sets["val"]
    with torch.no_grad():
        img = fusion_task.embed_images(module, fusion_task.Collate(val, module.tok, L, mean,
                                                                   std), len(val.captions))[0]
        txt = fusion_task.embed_texts(module, val.captions)[0]
    sen = fusion_task.text_vectors(module, val.captions)
    files = {f: i for i, f in enumerate(dict.fromkeys(val.files))}
    fid = torch.tensor([files[f] for f in val.files])
    positive = fid[:, None] == fid[None, :]

    def figures(scores):
        t2i, i2t = (fusion_task.recall_at(s, positive, ks=(1, 10))
                    for s in (scores.T, scores))
        return [t2i["r1"], t2i["r10"], i2t["r1"], i2t["r10"]]
    rows = [("no memory", figures(img @ txt.T))]
    for values in itertools.product(*GRID.values()):
        settings = dict(zip(GRID, values))
        rows.append((settings, figures(memory_scores(img, txt, sen, memory, **settings))))
    rows.sort(key=lambda r: -sum(r[1]))
    print(f"{len(rows) - 1} settings on {len(val.captions)} validation pairs, memory of "
          f"{len(memory.images)} training pairs; R@1 / R@10 text->image, image->text, mean")
    for settings, f in rows[:args.top] + [r for r in rows if r[0] == "no memory"]:
        print(" ".join(f"{x:.3f}" for x in f), f"{sum(f) / 4:.3f}", settings)


if __name__ == "__main__":
    main()
