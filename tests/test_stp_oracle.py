"""STP's loss (``megacpp_mcore/stp.py``) against its naive oracle (``ops/stp/naive.py``): the
value and the gradient w.r.t. the hidden states on the same sampled indices, in both forms,
with documents, padding and a sequence whose samples all have weight 0."""

import math

import pytest
import torch

from megacpp_mcore.ops.stp.naive import naive_stp_loss
from megacpp_mcore.stp import sample_points, stp_loss
from tests.compare import assert_close_rel, compare_outputs_and_grads

# stp.py computes the loss in float32 by design (its rows are cast with .float()), the oracle
# in float64: agreement is float32 rounding (measured: 2-3e-8 on the value, 7-9e-8 on the
# gradient at these sizes). A wrong index, sign or normalisation is off by 1e-1 or more.
FP32_LIMIT = 1e-5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _masks(batch, seq):
    eod = torch.zeros(batch, seq, dtype=torch.bool)
    eod[0, [11, 30]] = True  # three documents
    eod[2] = True  # every token ends a document: no room, weight 0 for all its samples
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[1, 40:] = False  # padding at the end of sequence 1
    return eod, valid


@pytest.mark.parametrize("form", ["triple", "span"])
def test_stp_loss_matches_the_oracle_on_the_same_samples(form):
    batch, seq, width, samples, gap, seed = 3, 48, 6, 24, 2, 7
    hidden = torch.randn(batch, seq, width, generator=_gen(0), dtype=torch.float64)
    eod, valid = _masks(batch, seq)
    sampling = dict(samples=samples, min_gap=gap, form=form, eod_mask=eod, valid_mask=valid)
    # stp_loss draws its samples from the generator it is given: the same seed, the same points
    points, weights = sample_points(batch, seq, generator=_gen(seed), **sampling)
    assert weights[2].eq(0).all() and weights[:2].eq(1).all()
    if form == "triple":  # stp.py's quadruple (s, r, t, t)
        assert torch.equal(points[..., 3], points[..., 2])
        indices = points[..., :3]
    else:  # (lo, a, b, hi)
        indices = points

    got, want = compare_outputs_and_grads(
        lambda h: stp_loss(h, generator=_gen(seed), **sampling),
        lambda h: naive_stp_loss(h, indices, weights, form),
        [hidden], ("loss", "d hidden"), limit=FP32_LIMIT)
    assert got[0].dtype == torch.float32 and want[0].dtype == torch.float64
    assert 0.1 < want[0].item() < 2.0  # random states: far from straight
    grad = want[1]
    sampled = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(2):
        sampled[b, indices[b].flatten()] = True
    assert grad[sampled].abs().sum(-1).gt(0).any()
    assert grad[~sampled].eq(0).all() and grad[2].eq(0).all()  # weight 0: no gradient


def test_oracle_gives_the_turning_angle_and_zero_on_a_line():
    """The oracle on its own, against closed forms: on a circle the chords (s, r) and (r, t)
    turn by (t - s) / 2 step angles; a straight trajectory gives 0 in both forms."""
    seq, step = 40, 2 * math.pi / 200
    theta = torch.arange(seq, dtype=torch.float64) * step
    circle = torch.zeros(1, seq, 4, dtype=torch.float64)
    circle[0, :, 0], circle[0, :, 1] = torch.cos(theta), torch.sin(theta)
    loss = naive_stp_loss(circle, torch.tensor([[[2, 7, 12], [0, 10, 20]]]), torch.ones(1, 2),
                          "triple")
    expected = ((1 - math.cos(5 * step)) + (1 - math.cos(10 * step))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-9)

    gen = _gen(2)
    start, direction = (torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2))
    speed = torch.rand(1, seq, 1, generator=gen, dtype=torch.float64).cumsum(1)
    line = start + speed * direction  # monotone, uneven speed along one line
    for form, idx in (("triple", [[[1, 4, 9]]]), ("span", [[[0, 3, 17, 39]]])):
        value = naive_stp_loss(line, torch.tensor(idx), torch.ones(1, 1), form)
        assert abs(value.item()) < 1e-12, form
    with pytest.raises(ValueError, match="a span sample has 4 indices"):
        naive_stp_loss(line, torch.tensor([[[1, 4, 9]]]), torch.ones(1, 1), "span")


def test_oracle_and_loss_part_on_a_wrong_index():
    """The comparison has teeth: the oracle on shifted indices is far from stp.py's loss."""
    hidden = torch.randn(1, 32, 6, generator=_gen(1), dtype=torch.float64)
    points, weights = sample_points(1, 32, samples=16, min_gap=2, generator=_gen(3))
    loss = stp_loss(hidden, samples=16, min_gap=2, generator=_gen(3))
    right = naive_stp_loss(hidden, points[..., :3], weights, "triple")
    wrong = naive_stp_loss(hidden, points[..., [0, 2, 1]], weights, "triple")
    assert_close_rel(loss, right, FP32_LIMIT, "loss")
    with pytest.raises(AssertionError, match="relative error"):
        assert_close_rel(loss, wrong, FP32_LIMIT, "loss")
