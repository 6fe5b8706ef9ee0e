"""Text-image fusion: ``python -m tasks.fusion`` trains a contrastive dual encoder and a
cross-attention fusion encoder on emoji image-caption pairs (beside a frozen sentence
encoder's head, ``data.sentence_encoder``) and evaluates retrieval
(contrastive, then re-ranked by the fusion encoder), zero-shot classification and an
unseen artwork; ``data=shapes`` trains the fusion encoder to answer questions about
procedurally drawn scenes.

    python -m tasks.fusion                                   # Noto emoji, CPU
    python -m tasks.fusion data=shapes                       # visual question answering
    python -m tasks.fusion data.manifest=~/pairs/train.jsonl # your own image-caption pairs
    python -m tasks.fusion mode=retrieve ckpt=CKPT images='x/*.png' texts=captions.txt
    python -m tasks.fusion mode=classify ckpt=CKPT images='x/*.png' classes='[cat,dog]'
    python -m tasks.fusion mode=answer ckpt=CKPT images='x/*.png' questions='[how many shapes?]'
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from data.cache import cache_dir
from data.errors import read_lines
from data.fusion import (
    PairSet,
    caption_words,
    load_rgb,
    near_siblings,
    prepare_emoji,
    prepare_shapes,
    read_pairs,
    unseen_words,
)
from data.images import split_indices
from data.lexicon import Lexicon, LexiconTokenizer, check_spec, load_lexicon
from data.sampling import ResumableLoader, SeededBatchSampler
from data.sentence import MINILM, sentence_encoder_dir
from data.text import Tokenizer, read_each, tokenizer_for_run, train_or_load_tokenizer
from modules.fusion import contrastive_loss, hard_negatives
from modules.memory import PairMemory
from modules.sentence import SentenceEncoder

from .framework import entry, training
from .framework.checkpoints import (
    CKPT_KEY,
    init_weights_from,
    load_weights_file,
    model_state,
    overrides_to_match,
    require_tensor_dict,
    start_meta,
)
from .framework.errors import UserError
from .framework.module import TaskModule
from .framework.reporting import gather_to_all
from .framework.runtime import is_rank_zero, run_dir

OBJECTIVES = ("contrastive", "match", "answer")


# ------------------------------------------------------------------------------- text
def encode_texts(tok: Tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """Texts -> padded ids ``(B, L)`` ending in </s> (cut to ``max_len``) and the mask."""
    rows = [tok.encode(t)[: max_len - 1] + [tok.EOS] for t in texts]
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), tok.PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, ids != tok.PAD


def fill(template: str, caption: str, labels: dict[str, str]) -> str:
    """A caption template such as ``"{caption} ({group})"``; label values have ``-`` read as
    a space (``face-smiling`` -> ``face smiling``)."""
    return template.format(caption=caption,
                           **{k: v.replace("-", " ") for k, v in labels.items()})


# ------------------------------------------------------------------------------- sentences
def _weights_sha256(folder: Path) -> tuple[str, str] | None:
    """(file name, SHA-256) of a sentence encoder folder's weights, or None without any;
    computed again only when the file changes."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return None
    st = weights[0].stat()
    return weights[0].name, _sha256_of(weights[0], st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sentence_spec(name: str | None) -> dict | None:
    """``data.sentence_encoder`` (``all-MiniLM-L6-v2``, prepared once, or a directory) as
    the checkpoint keeps it: its name and the SHA-256 of its weights; None when off."""
    if not name:
        return None
    folder = sentence_encoder_dir(str(name))
    weights = _weights_sha256(folder)
    return {"name": str(name) if str(name) == MINILM else str(folder.resolve()),
            "sha256": weights[1] if weights else None}


@functools.lru_cache(maxsize=2)
def _sentence_encoder(folder: str) -> SentenceEncoder:
    return SentenceEncoder(folder)


def load_sentence_encoder(spec: dict | None) -> SentenceEncoder | None:
    """The frozen sentence encoder ``spec`` (``sentence_spec``) names, one per process
    (its vectors are kept per text), refused when its weights are not the ones the model
    was trained with."""
    if spec is None:
        return None
    folder = sentence_encoder_dir(spec["name"])
    weights = _weights_sha256(folder)
    if spec.get("sha256") and weights and weights[1] != spec["sha256"]:
        raise UserError(f"sentence encoder {spec['name']}: {weights[0]} has changed "
                        f"(SHA-256 {weights[1][:12]}...); expected the weights the model "
                        f"was trained with ({spec['sha256'][:12]}...)")
    try:
        return _sentence_encoder(str(folder))
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise UserError(f"data.sentence_encoder={spec['name']}: {exc}") from None


# ------------------------------------------------------------------------------- data
@dataclass
class Split:
    """One split: its pairs and, for question answering, the flat (scene, question) list."""

    pairs: PairSet
    questions: list[tuple[int, str, str, str]]  # (scene index, question, answer, type)


def _subset(pairs: PairSet, idx: list[int]) -> PairSet:
    return PairSet(images=pairs.images[idx], captions=[pairs.captions[i] for i in idx],
                   labels={k: [v[i] for i in idx] for k, v in pairs.labels.items()},
                   ids=[pairs.ids[i] for i in idx], qa=[pairs.qa[i] for i in idx],
                   files=[pairs.files[i] for i in idx], skipped=[])


def load_splits(cfg: DictConfig, out: Path) -> tuple[dict[str, PairSet], dict[str, PairSet],
                                                     str]:
    """``{train, val, test}`` pair sets, extra test sets (other artwork), and a description
    of the source. Splits by seed are saved to ``split.json``."""
    d = cfg.data
    kw = dict(img_size=d.img_size, on_bad_image=d.on_bad_image)
    extra: dict[str, PairSet] = {}
    if d.name == "shapes" and d.manifest is None:
        root = prepare_shapes(d.train_scenes, d.val_scenes, d.test_scenes, d.scene_seed,
                              img_size=d.img_size)
        sets = {s: read_pairs(root / f"{s}.jsonl", **kw) for s in ("train", "val", "test")}
        return sets, extra, f"procedural shapes (seed {d.scene_seed}): {root}"
    if d.manifest is not None:
        manifest, source = Path(str(d.manifest)).expanduser(), str(d.manifest)
    else:
        root = prepare_emoji()
        manifest, source = root / "noto.jsonl", "Noto Color Emoji + Unicode emoji names"
    pairs = read_pairs(manifest, **kw)
    if len(pairs.captions) < 10:
        raise UserError(f"data.manifest={manifest} has {len(pairs.captions)} readable pairs; "
                        f"expected at least 10")
    split = split_indices(len(pairs.captions), d.split, cfg.seed)
    if is_rank_zero():
        (out / "split.json").write_text(json.dumps(
            {k: [pairs.ids[i] for i in v] for k, v in split.items()}) + "\n")
    sets = {k: _subset(pairs, v) for k, v in split.items()}
    sets["train"].skipped = pairs.skipped
    if d.manifest is None and d.other_artwork:
        other = read_pairs(prepare_emoji() / f"{d.other_artwork}.jsonl", **kw)
        test_ids = set(sets["test"].ids)
        extra[d.other_artwork] = _subset(other, [i for i, x in enumerate(other.ids)
                                                 if x in test_ids])
    return sets, extra, source


def flat_questions(pairs: PairSet) -> list[tuple[int, str, str, str]]:
    return [(i, q["question"], q["answer"], q.get("type", "all"))
            for i, qa in enumerate(pairs.qa) for q in qa]


class PairDataset(torch.utils.data.Dataset):
    """Items: (image index, caption text, [(question, answer id), ...]).

    A caption is drawn from ``templates`` (filled with the item's caption and labels) anew
    every time an item is read, and ``questions`` of the scene's questions (None: all),
    which then share one encoding of the image. With a ``lexicon`` (which knows the
    training words) a text is read as the lexicon reads it: a training text stays as it is
    and a validation text gets the kinds of its unseen words. With probability
    ``kinds_only`` a training text is its kinds alone (``"; insect, arthropod"``), so the
    model learns what the kinds look like: they are all an unseen word brings.
    """

    def __init__(self, pairs: PairSet, templates: list[str], answers: dict[str, int],
                 questions: int | None = None, lexicon: Lexicon | None = None,
                 kinds_only: float = 0.0):
        self.pairs, self.templates, self.answers = pairs, list(templates), answers
        self.questions, self.lexicon, self.kinds_only = questions, lexicon, kinds_only

    def __len__(self) -> int:
        return len(self.pairs.captions)

    def __getitem__(self, i: int):
        labels = {k: v[i] for k, v in self.pairs.labels.items()}
        template = self.templates[int(torch.randint(len(self.templates), (1,)))]
        qa = self.pairs.qa[i]
        if self.questions is not None and len(qa) > self.questions:
            qa = [qa[j] for j in torch.randperm(len(qa))[: self.questions].tolist()]
        text = fill(template, self.pairs.captions[i], labels)
        if self.lexicon is not None:
            kinds = self.lexicon.kinds_text(text)
            text = (kinds if kinds and float(torch.rand(())) < self.kinds_only
                    else self.lexicon(text))
        read = self.lexicon or (lambda q: q)
        return (i, text, [(read(q["question"]), self.answers.get(q["answer"], -1)) for q in qa])


class Collate:
    """Items -> a batch dict: normalised (and, in training, randomly shifted) images,
    caption ids/mask, question ids/mask, answer ids, keys of the texts and image files
    (which pairs belong together, see ``same_pair``) and, with a ``sentences`` encoder, the
    captions' sentence vectors."""

    def __init__(self, pairs: PairSet, tok: Tokenizer, max_len: int, mean, std,
                 shift: int = 0, sentences: SentenceEncoder | None = None):
        self.pairs, self.tok, self.max_len, self.shift = pairs, tok, max_len, shift
        self.sentences = sentences
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def images(self, idx: list[int]) -> torch.Tensor:
        x = self.pairs.images[idx].float() / 255
        if self.shift:  # random translation by up to `shift` pixels, edges replicated
            s = self.shift
            x = F.pad(x, (s, s, s, s), mode="replicate")
            h = x.shape[-1] - 2 * s
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            x = x[..., dy:dy + h, dx:dx + h]
        return (x - self.mean) / self.std

    def __call__(self, items):
        idx, captions, qas = zip(*items)
        ids, mask = encode_texts(self.tok, list(captions), self.max_len)
        flat = [(row, q, a) for row, qa in enumerate(qas) for q, a in qa] or [(0, "", -1)]
        rows, questions, answers = zip(*flat)
        q_ids, q_mask = encode_texts(self.tok, list(questions), self.max_len)
        batch = {"images": self.images(list(idx)), "ids": ids, "mask": mask,
                 "q_ids": q_ids, "q_mask": q_mask, "answers": torch.tensor(answers),
                 "q_image": torch.tensor(rows),
                 "text_key": text_keys(captions),
                 "image_key": text_keys([self.pairs.files[i] for i in idx])}
        if self.sentences is not None:
            batch["sentences"] = self.sentences(list(captions))
        return batch


def text_keys(texts) -> torch.Tensor:
    """A stable 63-bit key per string (equal strings, equal keys, in every process)."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(),
                                        "little") >> 1 for t in texts])


def same_pair(batch: dict, gather=lambda x: x) -> torch.Tensor:
    """``(B, B)``: True where image i and text j belong together: an identical text (a
    template without the caption, a repeated caption) or the same image file."""
    tk, ik = gather(batch["text_key"]), gather(batch["image_key"])
    return (tk[:, None] == tk[None, :]) | (ik[:, None] == ik[None, :])


# ------------------------------------------------------------------------------- module
MEMORY_KEY = "attnkit_pair_memory"  # the pair memory's tensors inside a checkpoint


class FusionModule(TaskModule):
    """Contrastive loss (gathered over DDP ranks with gradients), image-text matching on
    hard negatives, and answer classification, weighted by ``objectives``.

    ``meta``: ``tokenizer`` (sentencepiece model), ``lexicon`` (``data.lexicon`` and the
    training words: a text is read with the WordNet kinds of its other words; or None),
    ``max_text_len``, ``mean``/``std`` (per channel), ``answers`` (the answer vocabulary),
    ``label_classes`` ({label: names}), ``zero_shot_template``, ``sentence_encoder``
    (``sentence_spec``: the frozen encoder whose vectors the sentence head reads, or None).

    ``memory_source``: a ``Collate`` over training pairs (training only). Every checkpoint
    then holds their embeddings under the current weights (``MEMORY_KEY``), the pair memory
    that retrieval scores through (``modules.memory.memory_scores``); ``self.memory`` is
    the memory read from a checkpoint or last built.
    """

    task = "fusion"
    meta_types = {"tokenizer": bytes, "max_text_len": int, "mean": list, "std": list,
                  "answers": list, "zero_shot_template": str}

    def __init__(self, *, objectives: dict | None = None,
                 memory_source: Collate | None = None, **kwargs):
        super().__init__(**kwargs)
        self.memory_source, self.memory = memory_source, None
        self._memory_step: int | None = None
        self.objectives = {k: float(v) for k, v in (objectives or {}).items() if v}
        # Parts no objective trains stay fixed (DDP requires every trained parameter to get
        # a gradient): the joint-space projections and temperature without the contrastive
        # loss, the matching head without matching, the answer head without questions, the
        # fusion encoder without either.
        m, unused = self.model, []
        if "contrastive" not in self.objectives:
            unused += [m.text_proj, m.visual.head, m.logit_scale, m.logit_bias,
                       m.sentence_proj, m.sentence_logit_scale]
        if "match" not in self.objectives:
            unused.append(m.match_head)
        if "answer" not in self.objectives:
            unused.append(m.answer_head)
            if "match" not in self.objectives:
                unused.append(m.fusion)
        for part in unused:
            for p in ([part] if isinstance(part, torch.nn.Parameter) else
                      part.parameters() if part is not None else []):
                p.requires_grad_(False)
        self.tok = Tokenizer(self.meta["tokenizer"])
        lexicon = load_lexicon(self.meta.get("lexicon"))
        if lexicon is not None:  # every text is encoded with its WordNet kinds
            self.tok = LexiconTokenizer(self.tok, lexicon)
        self.sentences = load_sentence_encoder(self.meta.get("sentence_encoder"))
        if (self.sentences is None) != (m.sentence_proj is None) or (
                self.sentences is not None
                and self.sentences.dim != m.sentence_proj.in_features):
            raise UserError(f"the sentence encoder {self.meta.get('sentence_encoder')} does "
                            f"not fit the model's sentence head (model.sentence_dim="
                            f"{self.model_cfg.get('sentence_dim', 0)}); expected both or "
                            f"neither, of one width")
        self.val_outputs: list[dict] = []

    # the pair memory ---------------------------------------------------------------------
    @torch.no_grad()
    def build_memory(self) -> PairMemory | None:
        """The embeddings of ``memory_source``'s pairs under the current weights (None
        without a source or a sentence encoder)."""
        if self.memory_source is None or self.sentences is None:
            return None
        was_training = self.training
        self.eval()
        try:
            captions = self.memory_source.pairs.captions
            images = embed_images(self, self.memory_source, len(captions))[0]
            texts = embed_texts(self, captions)[0]
            return PairMemory(images.float().cpu(), texts.float().cpu(),
                              text_vectors(self, captions).cpu())
        finally:
            self.train(was_training)

    def keeps_memory(self) -> bool:
        """Whether checkpoints (and so the closing evaluation) get a pair memory: a memory
        source and a sentence encoder, and weights not sharded (FSDP: no single forward)."""
        return (self.memory_source is not None and self.sentences is not None
                and not isinstance(self.trainer.strategy, FSDPStrategy))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if not self.keeps_memory():
            return
        if self._memory_step != self.global_step:  # best and last at one step: built once
            # Under the weights this checkpoint holds (trainer.ema_decay: their average).
            live = {k: v.detach().clone() for k, v in self.state_dict().items()}
            self.load_state_dict(checkpoint["state_dict"])
            try:
                self.memory = self.build_memory()
            finally:
                self.load_state_dict(live)
            self._memory_step = self.global_step
        checkpoint[MEMORY_KEY] = self.memory.state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(MEMORY_KEY)
        m = self.model
        if state is None or m.sentence_proj is None:
            self.memory = None
            return
        try:
            self.memory = PairMemory.from_state(state, m.text_proj.out_features,
                                                m.sentence_proj.in_features)
        except ValueError as exc:
            path = getattr(self._trainer, "ckpt_path", None)
            if path is None:  # from_checkpoint names the file
                raise
            raise UserError(f"checkpoint {path}: {exc}; expected a fusion checkpoint as "
                            f"attnkit writes it") from None

    # training --------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        m, w = self.model, self.objectives
        img_emb, img_tok = m.encode_image(batch["images"])
        loss = torch.zeros((), device=img_emb.device)
        if "contrastive" in w or "match" in w:
            txt_emb, txt_tok = m.encode_text(batch["ids"], batch["mask"])
        if "contrastive" in w:
            # The negatives are the global batch: features from every rank, with gradients
            # (this rank's loss covers its own rows; DDP's gradient mean then equals the
            # gradient of the global-batch loss).
            all_img, all_txt = self._gather(img_emb), self._gather(txt_emb)
            b = img_emb.shape[0]
            rows = torch.arange(b, device=img_emb.device) + self.global_rank * b
            rows = rows if all_img.shape[0] > b else None
            same = same_pair(batch, lambda k: self._gather(k, grads=False))
            c = contrastive_loss(m.similarity(all_img, all_txt), m.loss_kind, rows, same)
            self.log("train/contrastive", c, prog_bar=True)
            if m.sentence_proj is not None:  # the sentence head: same images, own temperature
                all_sen = self._gather(m.encode_sentences(batch["sentences"]))
                s = contrastive_loss(m.sentence_similarity(all_img, all_sen), m.loss_kind,
                                     rows, same)
                self.log("train/sentence", s, prog_bar=True)
                c = c + s
            loss = loss + w["contrastive"] * c
        if "match" in w:
            loss = loss + w["match"] * self._match_loss(batch, img_emb, img_tok, txt_emb,
                                                        txt_tok)
        if "answer" in w:
            q_tok = m.text(batch["q_ids"], batch["q_mask"])
            logits = m.answer_logits(q_tok, batch["q_mask"], img_tok, batch["q_image"])
            a = F.cross_entropy(logits.float(), batch["answers"], ignore_index=-1)
            self.log("train/answer", a, prog_bar=True)
            loss = loss + w["answer"] * a
        self.log("train/loss", loss)
        return loss

    def _gather(self, x: torch.Tensor, grads: bool = True) -> torch.Tensor:
        """Rows from every rank, this rank's with their gradients."""
        if self.trainer.world_size == 1:
            return x
        return self.all_gather(x, sync_grads=grads).flatten(0, 1)

    def _match_loss(self, batch, img_emb, img_tok, txt_emb, txt_tok):
        """ITM: each image with its caption (1), with a hard negative caption (0), and each
        caption with a hard negative image (0); negatives drawn from the batch's
        contrastive similarities, never a pair that belongs together (``same_pair``)."""
        m = self.model
        with torch.no_grad():
            sim = img_emb @ txt_emb.T / 0.05
            same = same_pair(batch)
            neg_txt = hard_negatives(sim, same)
            neg_img = hard_negatives(sim.T, same)
        mask = batch["mask"]
        b = img_emb.shape[0]
        own = torch.arange(b, device=img_tok.device)
        logits = m.match_logits(torch.cat([txt_tok, txt_tok[neg_txt], txt_tok]),
                                torch.cat([mask, mask[neg_txt], mask]), img_tok,
                                torch.cat([own, own, neg_img]))
        target = torch.cat([torch.ones(b), torch.zeros(2 * b)]).to(logits)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        self.log("train/match", loss, prog_bar=True)
        return loss

    # validation: figures over the whole validation split --------------------------------
    def validation_step(self, batch, batch_idx):
        m = self.model
        img_emb, img_tok = m.encode_image(batch["images"])
        out = {"img": img_emb.float()}
        if "contrastive" in self.objectives or "match" in self.objectives:
            out["txt"] = m.retrieval_text(m.encode_text(batch["ids"], batch["mask"])[0],
                                          batch.get("sentences")).float()
        if "answer" in self.objectives:
            q_tok = m.text(batch["q_ids"], batch["q_mask"])
            logits = m.answer_logits(q_tok, batch["q_mask"], img_tok, batch["q_image"])
            out["right"] = (logits.argmax(-1) == batch["answers"]).float()
        self.val_outputs.append({k: v.cpu() for k, v in out.items()})

    def on_validation_epoch_end(self):
        # Ranks hold unequal shares of the split: gathered as objects, then every rank
        # computes the same figures over the whole validation split.
        outs, self.val_outputs = gather_to_all(self.val_outputs), []
        if not outs:
            return
        scores = []
        if "txt" in outs[0]:
            img, txt = torch.cat([o["img"] for o in outs]), torch.cat([o["txt"] for o in outs])
            sim = txt @ img.T  # validation R@1 counts each caption's own image only
            own = torch.arange(len(sim))
            r1_t2i = (sim.argmax(1) == own).float().mean()
            r1_i2t = (sim.argmax(0) == own).float().mean()
            self.log("val/r1_t2i", r1_t2i)
            self.log("val/r1_i2t", r1_i2t)
            scores.append((r1_t2i + r1_i2t) / 2)
        if "right" in outs[0]:
            acc = torch.cat([o["right"] for o in outs]).mean()
            self.log("val/answer_acc", acc)
            scores.append(acc)
        self.log("val/score", torch.stack(scores).mean(), prog_bar=True)


# ------------------------------------------------------------------------------- eval
@torch.no_grad()
def embed_images(module: FusionModule, collate: Collate, n: int, batch: int = 256):
    embs, toks = [], []
    for s in range(0, n, batch):
        x = collate.images(list(range(s, min(n, s + batch)))).to(module.device)
        e, t = module.model.encode_image(x)
        embs.append(e)
        toks.append(t)
    return torch.cat(embs), torch.cat(toks)


def _as_read(module: FusionModule, texts: list[str]) -> list[str]:
    """Texts as training gave them to the sentence encoder: with ``data.lexicon``, followed
    by the WordNet kinds of their unseen words (``PairDataset``)."""
    if isinstance(module.tok, LexiconTokenizer):
        return [module.tok.lexicon(t) for t in texts]
    return texts


@torch.no_grad()
def embed_texts(module: FusionModule, texts: list[str], batch: int = 256):
    embs, toks, masks = [], [], []
    L = module.meta["max_text_len"]
    for s in range(0, len(texts), batch):
        ids, mask = (x.to(module.device) for x in encode_texts(module.tok, texts[s:s + batch], L))
        e, t = module.model.encode_text(ids, mask)
        vectors = (module.sentences(_as_read(module, texts[s:s + batch])).to(e.device)
                   if module.sentences else None)
        embs.append(module.model.retrieval_text(e, vectors))
        toks.append(F.pad(t, (0, 0, 0, L - t.shape[1])))
        masks.append(F.pad(mask, (0, L - mask.shape[1])))
    return torch.cat(embs), torch.cat(toks), torch.cat(masks)


def text_vectors(module: FusionModule, texts: list[str]) -> torch.Tensor:
    """The texts' unit sentence vectors, read as training read them (``_as_read``)."""
    return module.sentences(_as_read(module, texts)).float()


def memory_settings(cfg: DictConfig) -> dict | None:
    """``eval.memory`` as ``memory_scores`` keywords, or None when it is off."""
    m = cfg.eval.memory
    if not m.enabled:
        return None
    return {k: m[k] for k in ("neighbours", "temperature", "text_weight", "image_weight",
                              "hubness")}


def first_stage(module: FusionModule, cfg: DictConfig, img_emb: torch.Tensor,
                txt_emb: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, bool]:
    """Scores ``(images, texts)`` before re-ranking: through the module's pair memory when
    it has one and ``eval.memory`` is on, else the contrastive similarity; and whether the
    memory was used."""
    settings = memory_settings(cfg)
    if module.memory is None or settings is None:
        return module.model.similarity(img_emb, txt_emb), False
    return module.model.memory_similarity(img_emb, txt_emb, text_vectors(module, texts),
                                           module.memory, **settings), True


def positive_rank(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per query (row of ``scores``): how many wrong candidates score at or above its best
    right one. A tie counts against the query, so pixel-identical images under different
    names (Noto draws some flags with another flag's glyph) are never a free hit."""
    best = scores.masked_fill(~positive, float("-inf")).amax(1, keepdim=True)
    return ((scores >= best) & ~positive).sum(1)


def recall_at(scores: torch.Tensor, positive: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Share of queries (rows of ``scores``) with a right candidate in their top k (ties
    with a wrong candidate count as misses, see ``positive_rank``)."""
    rank = positive_rank(scores, positive)
    return {f"r{k}": float((rank < k).float().mean()) for k in ks}


def reranks(module: FusionModule) -> bool:
    """Whether the fusion encoder re-ranks: it was trained for matching (checkpoints from
    before December 2026 do not say; theirs re-ranks whenever it has a matching head)."""
    trained = module.meta.get("objectives")
    return module.model.match_head is not None and (trained is None or "match" in trained)


@torch.no_grad()
def rerank(module: FusionModule, scores: torch.Tensor, query_is_text: bool, txt_tok, txt_mask,
           img_tok, k: int, alpha: float, batch: int = 512,
           rescored: torch.Tensor | None = None) -> torch.Tensor:
    """Scores with each query's top ``k`` by ``scores`` (contrastive, or through the pair
    memory) re-scored by the fusion encoder: match logit + ``alpha`` x that score, kept
    above every candidate outside the top k (whose order is unchanged). ``rescored``: a
    tensor shaped as ``scores`` that gets the re-scored values themselves at the top k (the
    given ones elsewhere)."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1)
    q = torch.arange(scores.shape[0]).repeat_interleave(k)
    c = top.indices.flatten()
    t_idx, i_idx = (q, c) if query_is_text else (c, q)
    logits = torch.cat([module.model.match_logits(txt_tok[t_idx[s:s + batch]],
                                                  txt_mask[t_idx[s:s + batch]],
                                                  img_tok[i_idx[s:s + batch]])
                        for s in range(0, len(q), batch)]).view(-1, k)
    new = logits + alpha * top.values
    if rescored is not None:
        rescored.copy_(scores).scatter_(1, top.indices, new)
    # The top k above every other score, which keep their values (and so their order).
    out = scores.clone()
    out.scatter_(1, top.indices, new - new.min() + scores.max() + 1)
    return out


@torch.no_grad()
def retrieval_figures(module: FusionModule, pairs: PairSet, collate: Collate,
                      cfg: DictConfig) -> tuple[dict, torch.Tensor]:
    """Recall@1/5/10 both ways over the whole set: contrastive, through the pair memory
    (when the module has one and ``eval.memory`` is on), and re-ranked (from the memory's
    scores then); with the scores re-ranking starts from ``(images, texts)``."""
    img_emb, img_tok = embed_images(module, collate, len(pairs.captions))
    txt_emb, txt_tok, txt_mask = embed_texts(module, pairs.captions)
    sim = module.model.similarity(img_emb, txt_emb)  # (images, texts)
    file_id = {f: i for i, f in enumerate(dict.fromkeys(pairs.files))}
    fid = torch.tensor([file_id[f] for f in pairs.files])
    positive = fid[:, None] == fid[None, :]  # the same image file
    res = {"contrastive": {"t2i": recall_at(sim.T, positive), "i2t": recall_at(sim, positive)}}
    first, used = first_stage(module, cfg, img_emb, txt_emb, pairs.captions)
    if used:
        res["memory"] = {"t2i": recall_at(first.T, positive), "i2t": recall_at(first, positive)}
    if reranks(module):
        e = cfg.eval
        res["reranked"] = {
            "t2i": recall_at(rerank(module, first.T, True, txt_tok, txt_mask, img_tok,
                                    e.rerank_k, e.rerank_alpha), positive),
            "i2t": recall_at(rerank(module, first, False, txt_tok, txt_mask, img_tok,
                                    e.rerank_k, e.rerank_alpha), positive)}
    return res, first


@torch.no_grad()
def zero_shot(module: FusionModule, img_emb: torch.Tensor, labels: dict[str, list[str]]
              ) -> dict:
    """Accuracy (and mean per-class recall) of choosing each image's label among the class
    names, by the similarity of the image to the filled ``zero_shot_template``."""
    out = {}
    for name, classes in module.meta["label_classes"].items():
        truth = [classes.index(v) if v in classes else -1 for v in labels.get(name, [])]
        if not truth or max(truth) < 0:
            continue
        prompts = [fill(module.meta["zero_shot_template"], "", {"label": c}) for c in classes]
        cls_emb = embed_texts(module, prompts)[0]
        pred = (img_emb @ cls_emb.T).argmax(1)
        t = torch.tensor(truth)
        ok = t >= 0
        recall = [float((pred[t == c] == c).float().mean()) for c in range(len(classes))
                  if (t == c).any()]
        out[name] = {"accuracy": float((pred[ok] == t[ok]).float().mean()),
                     "balanced_accuracy": sum(recall) / len(recall),
                     "classes": len(classes),
                     "majority_rate": max((t[ok] == c).float().mean().item()
                                          for c in range(len(classes)))}
    return out


def answer_figures(module: FusionModule, pairs: PairSet, collate: Collate,
                   blank: bool = False) -> dict:
    """VQA accuracy overall and per question type; ``blank``: every image replaced by the
    mean image (the text-only baseline)."""
    qs = flat_questions(pairs)
    answers = module.meta["answers"]
    right: dict[str, list[bool]] = {}
    with torch.no_grad():
        for s in range(0, len(qs), 256):
            chunk = qs[s:s + 256]
            scenes = list(dict.fromkeys(q[0] for q in chunk))  # each image encoded once
            x = collate.images(scenes)
            if blank:
                x = torch.zeros_like(x)
            img_tok = module.model.encode_image(x)[1]
            ids, mask = encode_texts(module.tok, [q[1] for q in chunk],
                                     module.meta["max_text_len"])
            row = torch.tensor([scenes.index(q[0]) for q in chunk])
            pred = module.model.answer_logits(module.model.text(ids, mask), mask,
                                              img_tok, row).argmax(-1)
            for (_, _, ans, typ), p in zip(chunk, pred.tolist()):
                right.setdefault(typ, []).append(answers[p] == ans)
    allr = [r for v in right.values() for r in v]
    return {"accuracy": sum(allr) / len(allr),
            "per_type": {t: sum(v) / len(v) for t, v in sorted(right.items())},
            "questions": len(allr)}


def majority_rates(train: PairSet, test: PairSet) -> dict[str, float]:
    """Per question type: the test accuracy of always answering the type's most common
    training answer."""
    common: dict[str, dict[str, int]] = {}
    for _, _, a, t in flat_questions(train):
        common.setdefault(t, {}).setdefault(a, 0)
        common[t][a] += 1
    best = {t: max(c, key=c.get) for t, c in common.items()}
    right: dict[str, list[bool]] = {}
    for _, _, a, t in flat_questions(test):
        right.setdefault(t, []).append(best.get(t) == a)
    return {t: sum(v) / len(v) for t, v in sorted(right.items())}


# ------------------------------------------------------------------------------- pictures
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _show(ax, img: torch.Tensor) -> None:
    ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def _three_lines(text: str, width: int) -> str:
    """``text`` wrapped at ``width`` characters, at most three lines (then "...")."""
    lines = textwrap.wrap(text, width)
    return "\n".join(lines[:3]) + (" ..." if len(lines) > 3 else "")


def plot_retrieval(pairs: PairSet, scores: torch.Tensor, path: Path, rows: int = 8,
                   seed: int = 0) -> Path:
    """Captions (rows) with their top-5 images by ``scores`` ``(texts, images)`` (all of
    them where the test split has fewer); the true image framed in green."""
    plt = _plt()
    pick = random.Random(seed).sample(range(len(pairs.captions)), min(rows, len(pairs.captions)))
    k = min(5, scores.shape[1])
    fig, axes = plt.subplots(len(pick), k + 1, figsize=(9, 1.3 * len(pick)), dpi=110,
                             squeeze=False, gridspec_kw={"width_ratios": [2.4] + [1] * k})
    for r, q in enumerate(pick):
        axes[r, 0].axis("off")
        axes[r, 0].text(0, 0.5, _three_lines(pairs.captions[q], 26), fontsize=8,
                        va="center")
        for c, i in enumerate(scores[q].topk(k).indices.tolist()):
            ax = axes[r, c + 1]
            _show(ax, pairs.images[i])
            hit = pairs.files[i] == pairs.files[q]
            for s in ax.spines.values():
                s.set_edgecolor("green" if hit else "lightgray")
                s.set_linewidth(3 if hit else 1)
    fig.suptitle(f"text -> image: top {k} test images per caption (true image framed green)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_similarity(sim: torch.Tensor, captions: list[str], path: Path, n: int = 24,
                    score_name: str = "cosine similarity x scale") -> Path:
    plt = _plt()
    n = min(n, sim.shape[0])
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    im = ax.imshow(sim[:n, :n].T.numpy(), cmap="viridis")
    ax.set_yticks(range(n), [c[:28] for c in captions[:n]], fontsize=6)
    ax.set_xlabel("test images (same order as the captions)")
    ax.set_title(f"{score_name}: captions (rows) against images")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_answers(module: FusionModule, pairs: PairSet, collate: Collate, path: Path,
                 n: int = 8) -> Path:
    plt = _plt()
    qs = flat_questions(pairs)[: n * 2]
    fig, axes = plt.subplots(2, n // 2, figsize=(2.4 * n // 2, 5.6), dpi=110)
    with torch.no_grad():
        img_tok = module.model.encode_image(collate.images([q[0] for q in qs]))[1]
        ids, mask = encode_texts(module.tok, [q[1] for q in qs], module.meta["max_text_len"])
        pred = module.model.answer_logits(module.model.text(ids, mask), mask, img_tok).argmax(-1)
    for ax, (i, q, a, _), p in zip(axes.flat, qs[::2], pred[::2].tolist()):
        _show(ax, pairs.images[i])
        guess = module.meta["answers"][p]
        ax.set_title(f"{q}\n{guess} ({'right' if guess == a else 'truth: ' + a})", fontsize=6,
                     color="green" if guess == a else "red")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- task
def training_lines(d: DictConfig, train: PairSet) -> list[str]:
    """Every text training can show: captions, questions, label names and templates."""
    lines = list(train.captions) + [q["question"] for qa in train.qa for q in qa]
    for vals in train.labels.values():
        lines += sorted({v.replace("-", " ") for v in vals if v})
    lines += [t.format(caption="", **{k: "" for k in train.labels}) for t in d.templates]
    return lines


def build_tokenizer(d: DictConfig, lines: list[str], lexicon: Lexicon | None,
                    start: tuple[str, dict] | None) -> Tokenizer:
    """The tokenizer of the checkpoint the run continues (``start``), the configured one,
    or one trained on the training texts (and, with a lexicon, on their WordNet kinds)."""
    def train():
        texts = lines + ([k for k in map(lexicon.kinds_text, lines) if k] if lexicon else [])
        return train_or_load_tokenizer("\n".join(texts), d.vocab_size,
                                       cache_dir() / "tokenized")

    return tokenizer_for_run(d.tokenizer, start, train)


def memory_pairs(cfg: DictConfig, train: PairSet, tok: Tokenizer, mean, std
                 ) -> Collate | None:
    """The training pairs a pair memory keeps (all, or a seeded choice of
    ``eval.memory.max_pairs`` in their order), or None when ``eval.memory`` is off."""
    if memory_settings(cfg) is None:
        return None
    n, cap = len(train.captions), cfg.eval.memory.max_pairs
    if n > cap:
        g = torch.Generator().manual_seed(cfg.seed)
        train = _subset(train, sorted(torch.randperm(n, generator=g)[:cap].tolist()))
    return Collate(train, tok, cfg.data.max_text_len, mean, std)


def lexicon_spec(d: DictConfig) -> dict | None:
    """``data.lexicon`` as a checked dict, or None when it is off."""
    spec = d.get("lexicon")
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    return check_spec(spec)


def apply_init_from(module: FusionModule, cfg: DictConfig) -> dict:
    """A fusion checkpoint, or an OpenCLIP ``CLIP`` state dict (ViT image tower + text
    transformer of this model's shape; the fusion encoder keeps its initialisation). The
    answer head's rows follow the answers by name; OpenCLIP's token table of another size
    is not loaded."""
    from modules.converters import clip_kwargs_from_open_clip, clip_state_dict_from_open_clip
    src = Path(str(cfg.init_from)).expanduser()
    obj = load_weights_file(src, "an attnkit fusion checkpoint or an OpenCLIP state dict")
    fresh: tuple[str, ...] = ()
    if isinstance(obj, dict) and CKPT_KEY in obj:
        state = model_state(src, FusionModule.task, module, FusionTask.named_rows)
        theirs = obj[CKPT_KEY].get("sentence_encoder") if isinstance(obj[CKPT_KEY],
                                                                     dict) else None
        ours = module.meta.get("sentence_encoder")
        if theirs and ours and theirs.get("sha256") != ours.get("sha256"):
            fresh = ("sentence_",)  # a head trained on another encoder's vectors
    elif isinstance(obj, dict) and "visual.conv1.weight" in obj:
        m = module.model_cfg
        heads = dict(vision_heads=m["vision"]["num_heads"], text_heads=m["text"]["num_heads"])
        require_tensor_dict(obj, f"init_from {src}", "the tensors of an open_clip.CLIP")
        try:
            want = clip_kwargs_from_open_clip(obj, **heads)
            state = clip_state_dict_from_open_clip(obj, **heads)
        except ValueError as exc:
            raise UserError(f"init_from {src}: {exc}") from None
        except KeyError as exc:
            raise UserError(f"init_from {src} lacks {exc} of an OpenCLIP CLIP state dict; "
                            f"expected the whole state dict of an open_clip.CLIP") from None
        except (IndexError, TypeError, AttributeError, RuntimeError) as exc:
            raise UserError(f"init_from {src} is not an OpenCLIP CLIP state dict this model "
                            f"can read ({type(exc).__name__}: {exc}); expected the tensors an "
                            f"open_clip.CLIP saves") from None
        overrides = open_clip_overrides(m, want)
        if overrides and cfg.init_strict:
            raise UserError(f"init_from {src} is an OpenCLIP CLIP that these model settings "
                            f"do not compute; add {' '.join(overrides)} (or init_strict=false "
                            f"to load its weights into these settings anyway)")
        fresh = ("fusion.", "match_head.", "answer_head.")
    else:
        raise UserError(f"init_from {src} is neither an attnkit fusion checkpoint nor an "
                        f"OpenCLIP CLIP state dict (no visual.conv1.weight)")
    own = module.model.state_dict()
    if not any(k.startswith("sentence_") for k in state):  # a sentence head starts fresh
        fresh += ("sentence_",)
    fresh += tuple(k for k in ("text.token_embed.weight",)  # the answers moved by name
                   if k in state and k in own and state[k].shape != own[k].shape)
    return init_weights_from(module.model, state, strict=cfg.init_strict, source=str(src),
                             skip=lambda k: k.startswith(fresh))


def open_clip_overrides(model_cfg: dict, want: dict) -> list[str]:
    """The command-line settings under which this model computes what the OpenCLIP model
    described by ``want`` (``clip_kwargs_from_open_clip``) does: its pooling, positions,
    normalisation, causal text, projections and sizes. Its fusion encoder and token table
    are not compared (they start fresh)."""
    from modules.fusion import TextEncoder, TextImageModel
    from modules.vit import VisionTransformer
    top = {k: v for k, v in want.items() if k not in ("vision", "text", "fusion_depth")}
    text = {k: v for k, v in want["text"].items() if k != "vocab_size"}
    return (overrides_to_match(model_cfg["vision"], want["vision"], VisionTransformer,
                               "model.vision.", {"img_size": "data.img_size"})
            + overrides_to_match(model_cfg["text"], text, TextEncoder, "model.text.",
                                 {"max_len": "data.max_text_len"})
            + overrides_to_match(model_cfg, top, TextImageModel))


def check_templates(d: DictConfig, train: PairSet) -> None:
    labels = {k: "x" for k in train.labels}
    for key, templates in (("data.templates", d.templates),
                           ("data.zero_shot_template", [d.zero_shot_template])):
        for t in templates:
            try:
                t.format(caption="x", label="x", **labels)
            except (KeyError, IndexError, ValueError) as exc:
                raise UserError(f"{key} has {t!r}, which names {exc}; expected fields among "
                                f"{['caption', 'label', *labels]}") from None


class FusionTask(training.Task):
    name, module_class = "fusion", FusionModule
    named_rows = {"answer_head": "answers"}
    monitor, monitor_mode = "val/score", "max"
    curves = [(["train/loss", "train/contrastive", "train/sentence", "train/match",
                "train/answer"], "loss_curves.png", "fusion: training losses"),
              (["val/r1_t2i", "val/r1_i2t", "val/answer_acc"], "val_curves.png",
               "validation")]

    def init_from(self, module, cfg, prep):
        return apply_init_from(module, cfg)

    mode_settings = {"retrieve": ("ckpt", "images", "texts"),
                     "classify": ("ckpt", "images", "classes"),
                     "answer": ("ckpt", "images", "questions")}

    def modes(self):
        return {"retrieve": run_retrieve, "classify": run_classify, "answer": run_answer}

    def prepare(self, cfg: DictConfig, out: Path) -> training.Prepared:
        d = cfg.data
        unknown = set(d.objectives) - set(OBJECTIVES)
        if not d.objectives:
            raise UserError(f"data.objectives is empty; expected some of {list(OBJECTIVES)}")
        if unknown:
            raise UserError(f"data.objectives has {sorted(unknown)}; expected some of "
                            f"{list(OBJECTIVES)}")
        spec = lexicon_spec(d)
        sets, extra, source = load_splits(cfg, out)
        train = sets["train"]
        has_qa = any(train.qa)
        if "answer" in d.objectives and not has_qa:
            raise UserError("data.objectives includes 'answer' but the training pairs have no "
                            "'qa' questions; remove it or give data with questions")
        check_templates(d, train)
        lines = training_lines(d, train)
        if spec is not None:  # the words the model reads in training need no kinds
            spec["known"] = sorted(set().union(*map(caption_words, lines)))
        lexicon = load_lexicon(spec)
        tok = build_tokenizer(d, lines, lexicon, start_meta(cfg, out, self.name))
        if is_rank_zero():
            tok.save(out / "tokenizer.model")
        kinds_only = float(spec.get("kinds_only", 0.0)) if spec is not None else 0.0
        answers = sorted({q["answer"] for qa in train.qa for q in qa}) if has_qa else []
        x = train.images.float() / 255
        mean = x.mean(dim=(0, 2, 3)).tolist()
        std = x.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()
        label_classes = {k: sorted({v for s in (*sets.values(), *extra.values())
                                    for v in s.labels.get(k, []) if v})
                         for k in d.zero_shot_labels if k in train.labels}
        model_cfg = training.model_config(cfg, num_answers=len(answers))
        model_cfg["text"]["vocab_size"] = tok.vocab_size
        sentence = sentence_spec(d.get("sentence_encoder"))
        sentences = load_sentence_encoder(sentence)
        model_cfg["sentence_dim"] = sentences.dim if sentences else 0
        loaders = {}
        index = {a: i for i, a in enumerate(answers)}
        for name, pairs in sets.items():
            is_train = name == "train"
            ds = (PairDataset(pairs, d.templates, index, d.questions_per_image, lexicon,
                              kinds_only) if is_train
                  else PairDataset(pairs, ["{caption}"], index, lexicon=lexicon))
            sampler = SeededBatchSampler(ds, d.batch_size, seed=cfg.seed, shuffle=is_train,
                                         drop_last=is_train)
            loaders[name] = ResumableLoader(
                ds, sampler, num_workers=d.num_workers, persistent_workers=d.num_workers > 0,
                collate_fn=Collate(pairs, tok, d.max_text_len, mean, std,
                                   d.shift if is_train else 0, sentences))
        memory_source = (memory_pairs(cfg, train, tok, mean, std)
                         if sentences is not None and "contrastive" in d.objectives else None)
        siblings = (near_siblings(train.captions, sets["test"].captions)
                    if d.name == "emoji" else [])
        unseen = (unseen_words(train.captions, sets["test"].captions)
                  if d.name == "emoji" else [])
        return training.Prepared(
            loaders["train"], loaders["val"], model_cfg,
            meta={"tokenizer": tok.proto, "lexicon": spec,
                  "max_text_len": d.max_text_len, "mean": mean,
                  "std": std, "answers": answers, "label_classes": label_classes,
                  "zero_shot_template": d.zero_shot_template,
                  "objectives": list(d.objectives), "sentence_encoder": sentence},
            options={"objectives": {k: cfg.loss[k] for k in d.objectives},
                     "memory_source": memory_source},
            info={"data": source, "train_items": len(train.captions),
                  "val_items": len(sets["val"].captions),
                  "test_items": len(sets["test"].captions), "skipped_images": len(train.skipped),
                  "objectives": list(d.objectives),
                  **({"test_with_near_sibling_in_train": sum(siblings),
                      "test_with_a_word_unseen_in_train": sum(map(bool, unseen))}
                     if siblings else {}),
                  **{f"{k}_items": len(v.captions) for k, v in extra.items()}},
            data={"sets": sets, "extra": extra, "tok": tok, "siblings": siblings,
                  "unseen_words": unseen,
                  "mean": mean, "std": std},
            split={k: v.ids for k, v in sets.items()})

    @torch.no_grad()
    def evaluate(self, trainer, module, prep, cfg, out):
        # Every rank holds the whole (small) test split; rank zero computes the figures.
        if not trainer.is_global_zero:
            return {}
        module.eval()
        sets, extra = prep.data["sets"], prep.data["extra"]
        mean, std = prep.data["mean"], prep.data["std"]
        figures: dict = {"best_val_score": float(trainer.checkpoint_callback.best_model_score
                                                 or float("nan"))}
        # under the best weights, as its checkpoint
        module.memory = module.build_memory() if module.keeps_memory() else None
        if module.memory is not None:
            figures["memory_pairs"] = len(module.memory.images)
        plots = []
        objectives = module.objectives
        for name, pairs in {"test": sets["test"], **extra}.items():
            collate = Collate(pairs, module.tok, module.meta["max_text_len"], mean, std)
            res: dict = {}
            if "contrastive" in objectives:
                res["retrieval"], sim = retrieval_figures(module, pairs, collate, cfg)
                img_emb = embed_images(module, collate, len(pairs.captions))[0]
                res["zero_shot"] = zero_shot(module, img_emb, pairs.labels)
                if name == "test":
                    plots += [plot_retrieval(pairs, sim.T, out / "retrieval_grid.png"),
                              plot_similarity(sim, pairs.captions, out / "similarity.png",
                                              score_name="score through the pair memory"
                                              if "memory" in res["retrieval"] else
                                              "cosine similarity x scale")]
                    res.update(_sibling_split(sim, prep.data["siblings"],
                                              prep.data["unseen_words"]))
            if "answer" in objectives:
                res["answer"] = answer_figures(module, pairs, collate)
                res["answer_image_blanked"] = answer_figures(module, pairs, collate, blank=True)
                res["answer_majority_rate"] = majority_rates(sets["train"], pairs)
                if name == "test":
                    plots.append(plot_answers(module, pairs, collate, out / "answers.png"))
            figures[name] = res
            print(summary_line(name, res))
        figures["plots"] = plots
        return figures


def summary_line(name: str, res: dict) -> str:
    """One printed line of a test set's figures (``results.json`` holds them all)."""
    parts = []

    def recalls(r: dict) -> str:
        return "/".join(f"{r[k]:.3f}" for k in ("r1", "r5", "r10"))
    retrieval = res.get("retrieval", {})
    stages = [k for k in ("reranked", "memory", "contrastive") if k in retrieval]
    for way, label in (("t2i", "text -> image"), ("i2t", "image -> text")):
        if stages:
            before = ", ".join(f"{k} {recalls(retrieval[k][way])}" for k in stages[1:])
            parts.append(f"{label} R@1/5/10 {recalls(retrieval[stages[0]][way])}"
                         + (f" ({before})" if before else ""))
    if res.get("zero_shot"):
        parts.append("zero-shot " + ", ".join(f"{k} {v['accuracy']:.3f}"
                                              for k, v in res["zero_shot"].items()))
    if "answer" in res:
        parts.append(f"answers {res['answer']['accuracy']:.3f} (image blanked "
                     f"{res['answer_image_blanked']['accuracy']:.3f})")
    return f"{name}: " + "; ".join(parts)


def _sibling_split(sim: torch.Tensor, siblings: list[bool], unseen: list[list[str]]) -> dict:
    """Text -> image R@1 and R@10, before re-ranking (through the pair memory when it is
    used), of the test captions with a near sibling in training, without one, and of the
    latter those whose every word occurs in a training caption and those with a word no
    training caption has. ``sim``: (images, texts), the i-th text describing the i-th
    image."""
    if not siblings:
        return {}
    scores = sim.T  # texts x images
    rank = positive_rank(scores, torch.eye(len(scores), dtype=torch.bool))
    groups = {"with_sibling": list(siblings),
              "without_sibling": [not s for s in siblings],
              "without_sibling_words_seen": [not s and not u for s, u in zip(siblings, unseen)],
              "without_sibling_unseen_word": [not s and bool(u)
                                              for s, u in zip(siblings, unseen)]}
    out = {}
    for name, member in groups.items():
        r = rank[torch.tensor(member, dtype=torch.bool)]
        out[f"count_{name}"] = len(r)
        if len(r):
            out[f"r1_t2i_{name}"] = float((r < 1).float().mean())
            out[f"r10_t2i_{name}"] = float((r < 10).float().mean())
    return {"siblings": out}


# ------------------------------------------------------------------------------- modes
def _load(cfg: DictConfig, mode: str) -> FusionModule:
    if not cfg.ckpt:
        raise UserError(f"mode={mode} needs ckpt=PATH, a checkpoint of the fusion task")
    if not cfg.images:
        raise UserError(f"mode={mode} needs images=GLOB, the image files")
    module = FusionModule.from_checkpoint(cfg.ckpt)
    trained = module.meta.get("objectives")  # not kept by checkpoints before December 2026
    if mode in ("retrieve", "classify") and trained is not None and "contrastive" not in trained:
        raise UserError(f"checkpoint {cfg.ckpt} was trained without the contrastive objective "
                        f"(data.objectives={list(trained)}), so its joint text-image space "
                        f"was never trained; expected one trained with 'contrastive' for "
                        f"mode={mode}")
    return module


def _read_images(module: FusionModule, pattern, on_bad: str) -> tuple[list[str], torch.Tensor,
                                                                         list[dict]]:
    size = module.model_cfg["vision"]["img_size"]
    files, imgs, skipped = read_each(pattern, "images", "image files",
                                     lambda f: torch.tensor(load_rgb(f, size)).permute(2, 0, 1),
                                     on_bad)
    x = torch.stack(imgs).float() / 255
    mean = torch.tensor(module.meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(module.meta["std"]).view(1, -1, 1, 1)
    return [str(f) for f in files], (x - mean) / std, skipped


def _as_list(value, what: str) -> list[str]:
    """A list, a UTF-8 file with one item a line, or one item (text that names no file)."""
    items = []
    if isinstance(value, str):
        p = Path(value).expanduser()
        if p.is_file():
            items = [ln.strip() for ln in read_lines(p, f"{what} file")
                     if ln.strip()]
        elif p.is_dir():
            raise UserError(f"{what}={value} is a folder; expected a file with one item a "
                            f"line, or the text itself")
        elif (p.suffix.lower() in (".txt", ".tsv", ".csv", ".jsonl", ".json")
              or value.startswith(("/", "./", "../", "~"))):
            raise UserError(f"{what}={value} does not exist; expected a file with one item "
                            f"a line, or the text itself")
        else:
            return [value]
    elif isinstance(value, (int, float)):  # texts=5: one item, as the text "5"
        return [str(value)]
    elif value is not None:
        items = [str(v) for v in OmegaConf.to_container(value)]
    if not items:
        raise UserError(f"{what} is empty; expected a list or a file with one per line")
    unique = list(dict.fromkeys(items))
    if len(unique) < len(items):  # a repeat would split a class's probability, or a rank
        repeated = next(t for t in unique if items.count(t) > 1)
        print(f"note: {what} gives {len(items) - len(unique)} item(s) more than once (such "
              f"as {repeated!r}); each is used once")
    return unique


def run_retrieve(cfg: DictConfig) -> dict:
    module = _load(cfg, "retrieve")
    if not cfg.texts:
        raise UserError("mode=retrieve needs texts=FILE (one caption per line) or a list")
    files, x, skipped = _read_images(module, cfg.images, cfg.data.on_bad_image)
    texts = _as_list(cfg.texts, "texts")
    rerank_on = reranks(module)
    with torch.no_grad():
        img_emb, img_tok = module.model.encode_image(x)
        txt_emb, txt_tok, txt_mask = embed_texts(module, texts)
        sim, memory = first_stage(module, cfg, img_emb, txt_emb, texts)  # (images, texts)
        t2i, i2t = sim.T, sim  # (order, score) pairs: one tensor for both without re-ranking
        t2i_score, i2t_score = t2i, i2t
        if rerank_on:  # as the closing evaluation ranks: the contrastive top k re-scored
            e = cfg.eval
            t2i_score, i2t_score = torch.empty_like(sim.T), torch.empty_like(sim)
            t2i = rerank(module, sim.T, True, txt_tok, txt_mask, img_tok, e.rerank_k,
                         e.rerank_alpha, rescored=t2i_score)
            i2t = rerank(module, sim, False, txt_tok, txt_mask, img_tok, e.rerank_k,
                         e.rerank_alpha, rescored=i2t_score)

    def ranked(order, score, names, k):  # the first rerank_k re-scored, the rest as before
        top = order.topk(min(k, len(names))).indices
        return [{"item": names[i], "score": round(float(score[i]), 4),
                 **({"rescored": n < cfg.eval.rerank_k} if rerank_on else {})}
                for n, i in enumerate(top.tolist())]

    first = f"memory ({len(module.memory.images)} training pairs)" if memory else "contrastive"
    result = {"ranking": (f"the {first} top {cfg.eval.rerank_k} re-scored by the fusion encoder "
                          f"(match logit + {cfg.eval.rerank_alpha} x {first} logit)" if rerank_on
                          else f"{first} (scaled cosine similarity"
                               f"{' through the training pairs' if memory else ''})"),
              "text_to_image": {t: ranked(t2i[j], t2i_score[j], files, cfg.top_k)
                                for j, t in enumerate(texts)},
              "image_to_text": {f: ranked(i2t[i], i2t_score[i], texts, cfg.top_k)
                                for i, f in enumerate(files)},
              "skipped_images": skipped}
    for t, best in result["text_to_image"].items():
        print(f"{t}: {', '.join(Path(b['item']).name for b in best)}")
    out = run_dir(cfg)
    result["picture"] = str(plot_ranked(texts, files, x, t2i, module.meta, out / "retrieve.png",
                                        t2i_score,
                                        "re-ranked score" if rerank_on else
                                        "memory score" if memory else
                                        "scaled cosine similarity"))
    return result


def plot_ranked(texts: list[str], files: list[str], x: torch.Tensor, scores: torch.Tensor,
                meta: dict, path: Path, shown: torch.Tensor | None = None,
                score_name: str = "scaled cosine similarity", rows: int = 8) -> Path:
    """Each text (up to ``rows``) with its top-5 images by ``scores`` ``(texts, images)``,
    each titled with its value in ``shown`` (default: ``scores``)."""
    shown = scores if shown is None else shown
    plt = _plt()
    mean = torch.tensor(meta["mean"]).view(-1, 1, 1)
    std = torch.tensor(meta["std"]).view(-1, 1, 1)
    k = min(5, len(files))
    n = min(rows, len(texts))
    fig, axes = plt.subplots(n, k + 1, figsize=(1.5 * (k + 2), 1.5 * n), dpi=110,
                             squeeze=False, gridspec_kw={"width_ratios": [2] + [1] * k})
    for r in range(n):
        axes[r, 0].axis("off")
        axes[r, 0].text(0, 0.5, _three_lines(texts[r], 30), fontsize=7, va="center")
        for c, i in enumerate(scores[r].topk(k).indices.tolist()):
            _show(axes[r, c + 1], (x[i] * std + mean).clamp(0, 1))
            axes[r, c + 1].set_title(f"{Path(files[i]).name[:14]} {float(shown[r, i]):.1f}",
                                     fontsize=6)
    fig.suptitle(f"texts and their top images (score: {score_name})")
    with warnings.catch_warnings():  # a glyph no font has is drawn as a box, said once here
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return path


def run_classify(cfg: DictConfig) -> dict:
    module = _load(cfg, "classify")
    classes = _as_list(cfg.classes, "classes")
    files, x, skipped = _read_images(module, cfg.images, cfg.data.on_bad_image)
    prompts = [fill(module.meta["zero_shot_template"], "", {"label": c}) for c in classes]
    with torch.no_grad():
        probs = module.model.similarity(module.model.encode_image(x)[0],
                                        embed_texts(module, prompts)[0]).softmax(-1)
    out = []
    for f, p in zip(files, probs):
        top = p.topk(min(cfg.top_k, len(classes)))
        ranked = [(classes[i], float(v)) for v, i in zip(top.values, top.indices)]
        print(f"{f}: " + ", ".join(f"{c} {v:.3f}" for c, v in ranked))
        out.append({"file": f, "top": ranked})
    return {"classes": classes, "predictions": out, "skipped_images": skipped}


def run_answer(cfg: DictConfig) -> dict:
    module = _load(cfg, "answer")
    if module.model.answer_head is None:
        raise UserError(f"checkpoint {cfg.ckpt} has no answer head (trained without "
                        f"questions); train with data=shapes or data with 'qa'")
    questions = _as_list(cfg.questions, "questions")
    files, x, skipped = _read_images(module, cfg.images, cfg.data.on_bad_image)
    out = []
    with torch.no_grad():
        img_tok = module.model.encode_image(x)[1]
        ids, mask = encode_texts(module.tok, questions, module.meta["max_text_len"])
        q_tok = module.model.text(ids, mask)
        for i, f in enumerate(files):
            logits = module.model.answer_logits(
                q_tok, mask, img_tok[i:i + 1].expand(len(questions), -1, -1))
            answers = [module.meta["answers"][a] for a in logits.argmax(-1).tolist()]
            for q, a in zip(questions, answers):
                print(f"{f}: {q} -> {a}")
            out.append({"file": f, "answers": dict(zip(questions, answers))})
    return {"answers": out, "skipped_images": skipped}


TASK = FusionTask()


def run(cfg: DictConfig) -> dict:
    """Train (or retrieve, classify, answer with a checkpoint) and return the results."""
    return training.run(TASK, cfg)


if __name__ == "__main__":
    entry.main("fusion", run)
