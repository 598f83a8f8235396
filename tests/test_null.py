"""Null tests of the methods besides DBL: each method with what it adds weighted 0 must be the
loss it builds on, so that a difference in a benchmark is the added term's and not the
plumbing's. Each one runs the method object as training builds it (`build_method` on a
config) on the same embeddings as its reference, and compares values and gradients.
- AOQ with `loss.aoq.offline_weight=0` is the hinge triplet with hardest in-batch negatives,
  bit for bit (the offline negatives are embedded beside the pairs and ignored);
- structure-aware distillation with its four weights 0 is the student's matching loss, bit
  for bit;
- CODER's DCL with `loss.coder.beta=0` (uniform weights) is InfoNCE at CODER's fixed
  temperature over the in-batch keys of all ranks plus the other modality's queue, less the
  queued keys of the query's own image (an independent cross-entropy reference, to float
  rounding).
DBL momentum with alpha = 0 is checked by training, in test_methods_train.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dbl_scale.config import load_config
from dbl_scale.methods import build_method
from dbl_scale.methods.coder import KeyQueues
from dbl_scale.models import Embeddings

AFTER_WARMUP = 10 ** 6  # a step past any sum-over-negatives warm-up: hardest negatives


def _unit(seed: int, n: int = 12, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).requires_grad_()


IDS = torch.tensor([0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9])  # two pairs share an image: masked as negatives


def _value_and_grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _method(*overrides: str):
    return build_method(load_config(None, list(overrides)))


def test_aoq_without_its_offline_terms_is_the_triplet_bit_for_bit():
    img, txt, negs = _unit(1), _unit(2), [_unit(s) for s in (3, 4, 5, 6)]  # I, T, then I-, I_{T-}, T-, T_{I-}
    out = Embeddings(torch.cat([img, negs[0], negs[1]]), torch.cat([txt, negs[2], negs[3]]))
    aoq = _method("loss.method=aoq", "loss.aoq.offline_weight=0").losses([out], IDS)[0]["loss"]
    triplet = _method("loss.method=triplet").losses([Embeddings(img, txt)], IDS, AFTER_WARMUP)[0]["loss"]
    got, want = _value_and_grads(aoq, [img, txt] + negs), _value_and_grads(triplet, [img, txt] + negs)
    assert torch.equal(got[0], want[0]) and want[0] > 0
    for g, w in zip(got[1], want[1]):
        assert torch.equal(g, w)
    assert all(not g.any() for g in got[1][2:])  # the offline negatives get nothing
    # and the knob is live: at its default the offline negatives change the loss and get gradient
    full = _method("loss.method=aoq").losses([out], IDS)[0]["loss"]
    value, grads = _value_and_grads(full, [img, txt] + negs)
    assert not torch.equal(value, want[0]) and all(g.any() for g in grads[2:])


def _structure_outs(seed: int):
    """(teacher, student) embeddings, the student's heads as StructureHead gives them."""
    student_img, student_txt = _unit(seed), _unit(seed + 1)
    teacher = Embeddings(_unit(seed + 2).detach(), _unit(seed + 3).detach())
    heads = {"lam": torch.tensor([0.5], dtype=torch.float64, requires_grad=True),
             "tau": torch.tensor([0.07], dtype=torch.float64, requires_grad=True),
             "repr_scale": torch.tensor([1 / 0.07], dtype=torch.float64, requires_grad=True),
             "teacher_img": _unit(seed + 4), "teacher_txt": _unit(seed + 5)}
    return [teacher, Embeddings(student_img, student_txt, heads=heads)]


STRUCTURE_OFF = ["loss.structure.weight=0", "loss.structure.consistency_weight=0",
                 "loss.structure.repr_weight_image=0", "loss.structure.repr_weight_text=0"]


@pytest.mark.parametrize("step", [0, AFTER_WARMUP], ids=["warm-up", "after"])
def test_structure_distillation_at_weight_0_is_the_students_matching_loss(step):
    outs = _structure_outs(10)
    student = outs[1]
    leaves = [student.img, student.txt]
    config = ["loss.method=structure", "loss.structure.teacher=unused", "loss.sum_warmup_steps=5"]
    terms = _method(*config, *STRUCTURE_OFF).losses(outs, IDS, step)[1]
    triplet = _method("loss.method=triplet", "loss.sum_warmup_steps=5").losses(
        [Embeddings(student.img, student.txt)], IDS, step)[0]["loss"]
    got, want = _value_and_grads(terms["loss"], leaves), _value_and_grads(triplet, leaves)
    assert torch.equal(got[0], want[0]) and want[0] > 0
    assert all(torch.equal(g, w) for g, w in zip(got[1], want[1]))
    assert terms["loss/structure"] > 0 and terms["loss/repr_text"] > 0  # computed and logged, weighted 0
    on = _method(*config).losses(outs, IDS, step)[1]["loss"]
    assert not torch.equal(on.detach(), want[0])  # the default weights do change the loss


def _coder_outs(seed: int, n: int = 8, d: int = 16):
    """(key, query) embeddings for CODER, the query's concept heads from a real ConceptBank."""
    from dbl_scale.models import ConceptBank
    bank = ConceptBank(d, 4, 0.1).double()
    key = Embeddings(_unit(seed, n, d).detach(), _unit(seed + 1, n, d).detach())
    q_img, q_txt = _unit(seed + 2, n, d), _unit(seed + 3, n, d)
    return [key, Embeddings(q_img, q_txt, heads=bank(q_img, q_txt))]


def _infonce_with_queue(q: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, ids: torch.Tensor,
                        queue_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over queries of -log softmax of the own key among [own key, in-batch keys of other
    images, the queue's keys of other images], written out with F.cross_entropy (the reference)."""
    total = 0.0
    for i in range(q.shape[0]):
        others = [j for j in range(keys.shape[0]) if ids[j] != ids[i]]
        queued = [j for j in range(queue.shape[0]) if queue_ids[j] != ids[i]]
        logits = torch.cat([q[i] @ keys[[i] + others].t(), q[i] @ queue[queued].t()]) / temperature
        total = total + F.cross_entropy(logits[None], torch.tensor([0]), reduction="sum")
    return total


def test_coder_dcl_with_uniform_weights_is_infonce_over_the_same_queues():
    ids = torch.tensor([0, 1, 2, 2, 3, 4, 5, 6])
    outs = _coder_outs(20)
    coder = _method("loss.method=coder", "loss.coder.beta=0", "loss.coder.concept_weight=0",
                    "loss.coder.queue_size=24")
    coder.queues = KeyQueues(24, 16, dtype=torch.float64)
    queue_ids = torch.arange(100, 124)
    queue_ids[[3, 9, 10]] = torch.tensor([2, 2, 5])  # older keys of images in the batch: not negatives
    coder.queues.push(_unit(30, 24).detach(), _unit(31, 24).detach(), queue_ids)
    terms = coder.losses(outs, ids)[1]
    key, query = outs
    t = coder.loss_cfg.coder.temperature
    want = (_infonce_with_queue(query.img, key.txt, coder.queues.txt, ids, queue_ids, t)
            + _infonce_with_queue(query.txt, key.img, coder.queues.img, ids, queue_ids, t)) / (2 * len(ids))
    leaves = [query.img, query.txt]
    got, ref = _value_and_grads(terms["loss"], leaves), _value_and_grads(want, leaves)
    assert torch.allclose(got[0], ref[0], rtol=1e-12, atol=0)
    assert all(torch.allclose(g, w, rtol=1e-10, atol=1e-12) for g, w in zip(got[1], ref[1]))
    assert terms["loss/dcl_concept"] > 0  # the concept terms are there, weighted 0
    diverse = _method("loss.method=coder", "loss.coder.concept_weight=0", "loss.coder.queue_size=24")
    diverse.queues = coder.queues
    assert not torch.allclose(diverse.losses(outs, ids)[1]["loss"].detach(), ref[0])  # beta = 1 reweights
