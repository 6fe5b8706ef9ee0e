"""The sliced output layer + cross entropy against one call on the whole batch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules import losses
from modules.losses import head_cross_entropy


def _case(ignore: int, vocab: int = 50, shape=(3, 7), dim: int = 4):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*shape, dim, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[0, :3] = ignore
    head = nn.Linear(dim, vocab, bias=False).double()
    return hidden, head, targets


def _calls(head: nn.Module) -> list[int]:
    rows = []
    head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    return rows


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_slices_give_the_loss_and_gradients_of_one_call(reduction, smoothing):
    hidden, head, targets = _case(ignore=-1)
    kw = dict(ignore_index=-1, label_smoothing=smoothing, reduction=reduction)
    h1 = hidden.clone().requires_grad_()
    ref = F.cross_entropy(head(h1).flatten(0, 1), targets.flatten(), **kw)
    ref = ref.view(targets.shape) if reduction == "none" else ref
    (ref.sum() if reduction == "none" else ref).backward()
    ref_w, head.weight.grad = head.weight.grad, None

    rows = _calls(head)
    h2 = hidden.clone().requires_grad_()
    got = head_cross_entropy(h2, head, targets, max_logits=4 * 50, **kw)  # 4 rows a slice
    (got.sum() if reduction == "none" else got).backward()
    assert rows == [4, 4, 4, 4, 4, 1]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, ref_w, rtol=1e-12, atol=1e-12)


def test_cpu_slices_at_the_default_budget_and_one_call_when_it_fits(monkeypatch):
    monkeypatch.setattr(losses, "MAX_LOGITS", 200)
    hidden, head, targets = _case(ignore=-100, vocab=50, shape=(2, 5))
    rows = _calls(head)
    sliced = head_cross_entropy(hidden, head, targets, reduction="none")
    assert rows == [4, 4, 2]                # 200 logits a slice: 4 rows of 50
    rows.clear()
    whole = head_cross_entropy(hidden, head, targets, max_logits=0, reduction="none")
    assert rows == [10]                     # 0: no slicing
    assert sliced.shape == whole.shape == targets.shape
    torch.testing.assert_close(sliced, whole)


def test_no_slices_thinner_than_the_features():
    """A slice of fewer rows than features would make each slice's weight gradient larger
    than its logits (a vocabulary of 150,000): one call then."""
    hidden, head, targets = _case(ignore=-100, vocab=50, shape=(2, 5), dim=8)
    rows = _calls(head)
    head_cross_entropy(hidden, head, targets, max_logits=4 * 50)  # 4 rows < 8 features
    assert rows == [10]
    head_cross_entropy(hidden, head, targets, max_logits=8 * 50)
    assert rows == [10, 8, 2]


def test_the_language_model_and_translation_losses_go_through_the_slices(monkeypatch):
    """The tasks' training losses equal one cross entropy over the full logits while their
    output layers see slices."""
    from tasks.lm import LMModule
    from tasks.translation import TranslationModule

    monkeypatch.setattr(losses, "MAX_LOGITS", 61 * 32)  # 32 rows a slice
    torch.manual_seed(0)
    module = LMModule(model_cfg=dict(_target_="modules.lm.CausalLM", vocab_size=61,
                                     embed_dim=32, depth=1, num_heads=4, max_seq_len=32))
    lm = module.model.eval()
    batch = torch.randint(0, 61, (4, 18))
    batch[1, -4:] = -1
    rows = _calls(lm.lm_head)
    loss, count = module._loss(batch)
    assert rows == [32, 32, 4]
    ref = F.cross_entropy(lm(batch[:, :-1].clamp(min=0)).flatten(0, 1), batch[:, 1:].flatten(),
                          ignore_index=-1)
    torch.testing.assert_close(loss, ref)
    assert count == 68 - 4

    module = TranslationModule(model_cfg=dict(
        _target_="modules.seq2seq.Seq2SeqTransformer", vocab_size=61, embed_dim=32,
        encoder_depth=1, decoder_depth=1, num_heads=4, max_seq_len=32))
    s2s = module.model.eval()  # no dropout: the two forward passes must agree
    src, tgt = torch.randint(4, 61, (4, 9)), torch.randint(4, 61, (4, 18))
    tgt[2, -3:] = s2s.pad_id
    rows = _calls(s2s.lm_head)
    loss, count = module._loss((src, tgt), smoothing=0.1)
    assert rows == [32, 32, 4]
    ref = F.cross_entropy(s2s(src, tgt[:, :-1]).flatten(0, 1), tgt[:, 1:].flatten(),
                          ignore_index=s2s.pad_id, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)
    assert count == 68 - 3


def test_bad_reduction_is_named():
    hidden, head, targets = _case(ignore=-100)
    with pytest.raises(ValueError, match="reduction"):
        head_cross_entropy(hidden, head, targets, reduction="avg")
